"""The HTTP server span of an aiohttp process (executors), from the caller's ``traceparent``.

Kept apart from `cornserve.runtime.tracing` because it imports aiohttp, which only the processes
that serve HTTP install (the runtime itself does not depend on it). Polls (``/health``,
``/metrics``) get no span: the task manager's health checks would otherwise start a trace each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Middleware

from cornserve.runtime.tracing import mark_error, server_span, set_attributes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNTRACED_PATHS = frozenset({"/health", "/metrics"})


def route_template(request: web.Request) -> str:
    """The route a request matched, as its template ("unmatched" for 404/405: raw paths are unbounded)."""
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def server_span_middleware(untraced: Collection[str] = UNTRACED_PATHS) -> Middleware:
    """A middleware running each request (but `untraced` paths) in a server span named by its route."""

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in untraced:
            return await handler(request)
        route = route_template(request)
        attributes = {"http.request.method": request.method, "http.route": route}
        with server_span(f"{request.method} {route}", request.headers, attributes) as current:
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                set_attributes({"http.response.status_code": status}, current)
                if status >= 500:
                    mark_error(f"HTTP {status}", current)

    return traced
