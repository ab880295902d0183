"""What the gateway adds to each request's server span: the app it reached and the request id.

The span itself (the root of every request's trace, or a caller's continuation) and the request
metrics come from one middleware, `cornserve.runtime.httptrace.server_span_middleware`, outermost so
it covers everything the request does (admission, the app driver, graph submissions, streaming the
answer) and sees the status the client got. The gateway traces every path, polls included.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from cornserve.gateway.metrics import APP_NAME_KEY, observe_request
from cornserve.runtime.httptrace import server_span_middleware
from cornserve.runtime.logging import request_id_var

APP_ATTRIBUTE = "cornserve.app"


def request_attributes(request: web.Request) -> dict[str, str | int]:
    """The app the request reached (known once it passed an admission gate) and its request id."""
    outcome: dict[str, str | int] = {}
    if isinstance(app := request.get(APP_NAME_KEY), str):
        outcome[APP_ATTRIBUTE] = app
    if (request_id := request_id_var.get()) is not None:
        outcome["cornserve.request_id"] = request_id
    return outcome


def observing_middleware() -> Middleware:
    """The gateway's outermost middleware: a server span and the request metrics for every request."""
    return server_span_middleware(untraced=(), attributes=request_attributes, observe=observe_request)
