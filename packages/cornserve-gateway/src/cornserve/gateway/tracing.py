"""The gateway's HTTP server span: the root of every request's trace (or a caller's continuation).

Outermost middleware, so the span covers everything the request does (admission, the app driver,
graph submissions, streaming the answer) and sees the status the client got. Its name is the method
and the route template (``POST /apps/{name}/invoke``), never the raw path: span names must stay
few. The app's name, known once the request reached its admission gate, is an attribute.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cornserve.gateway.metrics import APP_NAME_KEY, route_of
from cornserve.runtime.logging import request_id_var
from cornserve.runtime.tracing import mark_error, server_span, set_attributes

APP_ATTRIBUTE = "cornserve.app"


@web.middleware
async def tracing_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Run the request inside an HTTP server span, a child of the caller's ``traceparent`` if sent."""
    route = route_of(request)
    attributes = {"http.request.method": request.method, "http.route": route}
    with server_span(f"{request.method} {route}", request.headers, attributes) as current:
        status = 500
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            outcome: dict[str, str | int] = {"http.response.status_code": status}
            if isinstance(app := request.get(APP_NAME_KEY), str):
                outcome[APP_ATTRIBUTE] = app
            if (request_id := request_id_var.get()) is not None:
                outcome["cornserve.request_id"] = request_id
            set_attributes(outcome, current)
            if status >= 500:
                mark_error(f"HTTP {status}", current)
