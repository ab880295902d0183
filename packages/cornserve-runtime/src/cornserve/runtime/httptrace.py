"""Observing each HTTP request of an aiohttp process: its server span and, where wanted, its metrics.

One middleware for the gateway and the executors, so the span and the counters agree on the route
and the final status. It is outermost: it sees the status the client got, errors included. Span
names are the method and the route template (``POST /apps/{name}/invoke``), never the raw path:
span names and metric labels must stay few.

Kept apart from `cornserve.runtime.tracing` because it imports aiohttp, which only the processes
that serve HTTP install (the runtime itself does not depend on it). Executors give polls
(``/health``, ``/metrics``) no span: the task manager's health checks would otherwise start a trace
each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Mapping

from aiohttp import web
from aiohttp.typedefs import Middleware

from cornserve.runtime.tracing import mark_error, server_span, set_attributes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SpanAttributes = Callable[[web.Request], Mapping[str, str | int]]
"""Extra attributes of a finished request's span, read after its handler (e.g. the app it reached)."""
RequestObserver = Callable[[web.Request, str, int, float], None]
"""Called once per finished request with (request, route template, status, seconds): metrics."""

UNTRACED_PATHS = frozenset({"/health", "/metrics"})


def route_template(request: web.Request) -> str:
    """The route a request matched, as its template ("unmatched" for 404/405: raw paths are unbounded)."""
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def server_span_middleware(
    untraced: Collection[str] = UNTRACED_PATHS,
    attributes: SpanAttributes | None = None,
    observe: RequestObserver | None = None,
) -> Middleware:
    """A middleware running each request (but `untraced` paths) in a server span named by its route.

    `attributes` adds span attributes once the handler has run; `observe` sees every request,
    untraced ones included, with its final status and duration.
    """

    @web.middleware
    async def observed(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        route = route_template(request)
        status = 500
        traced = request.path not in untraced
        span_attributes = {"http.request.method": request.method, "http.route": route}
        span = (
            server_span(f"{request.method} {route}", request.headers, span_attributes)
            if traced
            else contextlib.nullcontext(None)
        )
        with span as current:
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                if observe is not None:
                    observe(request, route, status, time.monotonic() - started)
                if current is not None:
                    outcome: dict[str, str | int] = {"http.response.status_code": status}
                    if attributes is not None:
                        outcome.update(attributes(request))
                    set_attributes(outcome, current)
                    if status >= 500:
                        mark_error(f"HTTP {status}", current)

    return observed
