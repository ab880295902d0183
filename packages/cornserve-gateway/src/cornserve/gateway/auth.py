"""Who may call which route: bearer tokens with two scopes, checked by one middleware.

*admin* manages the cluster (apps, task libraries, scaling, sessions, and the listings that reveal
how it is deployed); *invoke* calls apps. The admin token holds both scopes; an API key
(``CORNSERVE_API_KEYS``) holds *invoke* only, and without API keys invoking needs the admin token.

Every route declares its scope in `ROUTE_SCOPES`; `check_route_scopes` refuses an application with
an undeclared route, so a new route cannot go out unprotected by omission.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Middleware

from cornserve.gateway.errors import HTTPError
from cornserve.runtime.secrets import constant_time_equal

logger = logging.getLogger(__name__)

Scope = Literal["open", "invoke", "admin"]

ROUTE_SCOPES: dict[tuple[str, str], Scope] = {
    ("GET", "/health"): "open",
    # Counts and latencies per route and app name; no payloads, tokens or ids (docs/security.md).
    ("GET", "/metrics"): "open",
    # The document lists every app's request and response schema: what an invoke client needs.
    ("GET", "/openapi.json"): "invoke",
    ("POST", "/apps"): "admin",
    ("GET", "/apps"): "admin",
    ("GET", "/apps/{name}"): "admin",
    ("DELETE", "/apps/{name}"): "admin",
    # Tracing runs the app's serve (recording only): it shows how the cluster's tasks are composed.
    ("POST", "/apps/{name}/graph"): "admin",
    ("POST", "/apps/{name}/invoke"): "invoke",
    ("GET", "/tasks"): "admin",
    ("POST", "/tasks/{key}/scale"): "admin",
    ("POST", "/tasklibs"): "admin",
    ("GET", "/tasklibs"): "admin",
    # Sessions deploy tasks and run arbitrary task graphs: cluster management, not app use.
    ("POST", "/sessions"): "admin",
    ("POST", "/sessions/{id}/tasks"): "admin",
    ("POST", "/sessions/{id}/invoke"): "admin",
    ("POST", "/sessions/{id}/heartbeat"): "admin",
    ("DELETE", "/sessions/{id}"): "admin",
    # The OpenAI-compatible front door: invoking apps, and the list of the apps it serves.
    ("POST", "/v1/chat/completions"): "invoke",
    ("GET", "/v1/models"): "invoke",
}
"""(method, route path) → scope of every route of the gateway (HEAD is checked as GET)."""

UNMATCHED_SCOPE: Scope = "invoke"
"""A request that matches no route (404/405) still needs a valid token, so paths cannot be probed."""

MIN_TOKEN_CHARS = 16
"""Shorter admin tokens or API keys are refused: they could be guessed."""

REALM = "cornserve"


class AuthConfigError(RuntimeError):
    """The gateway's tokens are missing or unusable; the message says what to set."""


class UnscopedRouteError(RuntimeError):
    """A route of the application has no entry in `ROUTE_SCOPES`."""


def _method(method: str) -> str:
    return "GET" if method == "HEAD" else method


def check_route_scopes(app: web.Application) -> None:
    """Raise UnscopedRouteError naming every route of `app` that `ROUTE_SCOPES` does not declare."""
    missing = sorted(
        {
            f"{route.method} {route.resource.canonical}"
            for route in app.router.routes()
            if route.resource is not None
            and (_method(route.method), route.resource.canonical) not in ROUTE_SCOPES
        }
    )
    if missing:
        raise UnscopedRouteError(
            f"route(s) without a declared scope: {', '.join(missing)}; add them to ROUTE_SCOPES in {__name__}"
        )


def route_scope(request: web.Request) -> Scope:
    """The scope the request's route needs (undeclared routes need admin, unmatched ones invoke)."""
    resource = request.match_info.route.resource
    if resource is None:
        return UNMATCHED_SCOPE
    return ROUTE_SCOPES.get((_method(request.method), resource.canonical), "admin")


def _digest(token: str) -> str:
    # Comparing fixed-length digests keeps the time independent of the tokens' lengths too.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Credentials:
    """The admin token and the API keys the gateway accepts (kept as digests)."""

    admin_digest: str = field(repr=False)
    api_key_digests: tuple[str, ...] = field(repr=False)

    @classmethod
    def from_tokens(cls, admin_token: str, api_keys: Iterable[str] = ()) -> Credentials:
        """Check the tokens are long enough to be secret; raises AuthConfigError."""
        if len(admin_token) < MIN_TOKEN_CHARS:
            raise AuthConfigError(
                f"the admin token is shorter than {MIN_TOKEN_CHARS} characters; use a random one "
                '(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))")'
            )
        keys = tuple(api_keys)
        short = [index + 1 for index, key in enumerate(keys) if len(key) < MIN_TOKEN_CHARS]
        if short:
            raise AuthConfigError(
                f"CORNSERVE_API_KEYS entry(ies) {short} are shorter than {MIN_TOKEN_CHARS} characters; "
                "use random keys"
            )
        return cls(_digest(admin_token), tuple(_digest(k) for k in keys))

    def scopes_of(self, token: str) -> frozenset[Scope]:
        """The scopes `token` holds (empty when it is unknown); every key is compared, in constant time."""
        given = _digest(token)
        admin = constant_time_equal(given, self.admin_digest)
        invoke = False
        for key in self.api_key_digests:
            invoke |= constant_time_equal(given, key)  # no short cut: the time does not say which matched
        if admin:
            return frozenset({"admin", "invoke"})
        return frozenset({"invoke"}) if invoke else frozenset()


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _unauthorized(request: web.Request, message: str, error: str | None) -> web.Response:
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    response = HTTPError(401, "unauthorized", message).response_for(request)
    response.headers["WWW-Authenticate"] = challenge
    return response


def _forbidden(request: web.Request, message: str) -> web.Response:
    response = HTTPError(403, "forbidden", message).response_for(request)
    response.headers["WWW-Authenticate"] = f'Bearer realm="{REALM}", error="insufficient_scope"'
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def auth_middleware(credentials: Credentials) -> Middleware:
    """The middleware: 401 without a known bearer token, 403 when the token lacks the route's scope."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = route_scope(request)
        if scope == "open":
            return await handler(request)
        token = bearer_token(request)
        where = f"{request.method} {request.path}"
        if token is None:
            logger.info("%s from %s: no bearer token (401)", where, request.remote)
            return _unauthorized(
                request,
                f"{where} needs an 'Authorization: Bearer <token>' header "
                f"({'the admin token' if scope == 'admin' else 'an API key or the admin token'})",
                None,
            )
        scopes = credentials.scopes_of(token)
        if not scopes:
            logger.info("%s from %s: unknown token (401)", where, request.remote)
            return _unauthorized(request, "the bearer token is not valid for this gateway", "invalid_token")
        if scope not in scopes:
            logger.info("%s from %s: an API key on an admin route (403)", where, request.remote)
            return _forbidden(request, f"{where} needs the admin token; an API key may only invoke apps")
        return await handler(request)

    return authenticate
