"""HTTP calls to the gateway; replies are the models of `cornserve.bus.gateway_api` (the gateway's contract)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import TypeAdapter

from cornserve.bus.control import DeploymentInfo, ProgressEvent
from cornserve.bus.gateway_api import (
    AppDetail,
    AppGraph,
    AppRegistration,
    AppRemoval,
    AppSummary,
    Health,
    ScaleBody,
    TaskLibrary,
    TaskLibraryUpload,
    TaskListing,
)
from cornserve.client.auth import Token, client_ssl_context, how_to_authenticate, resolve_token
from cornserve.client.errors import CornserveAuthError, CornserveError

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    """`CORNSERVE_URL`, or the local default."""
    return os.environ.get("CORNSERVE_URL", DEFAULT_URL).rstrip("/")


def auth_hint(status: int, token: Token | None, state_dir: Path | None = None) -> str:
    """What to do about a 401/403, naming the token that was sent by where it came from."""
    if token is None:
        return f"no token was sent: {how_to_authenticate(state_dir)}"
    if status == 403:
        return f"the token from {token.source} may only invoke apps; this needs the admin token"
    return (
        f"the token from {token.source} was refused: is it this cluster's? {how_to_authenticate(state_dir)}"
    )


async def raise_for_error(response: aiohttp.ClientResponse, auth_help: str | None = None) -> None:
    """Turn a 4xx/5xx reply into CornserveError with the gateway's message (CornserveAuthError for 401/403)."""
    if response.status < 400:
        return
    text = await response.text()
    try:
        body = json.loads(text)
    except ValueError:
        body = {"error": "http_error", "message": text.strip()[:2000]}
    if not isinstance(body, dict):
        body = {"error": "http_error", "message": str(body)}
    if response.status in (401, 403):
        message = str(body.get("message", text)) + (f" — {auth_help}" if auth_help else "")
        raise CornserveAuthError(
            response.status, str(body.get("error", "error")), message, body.get("detail")
        )
    raise CornserveError(
        response.status, str(body.get("error", "error")), str(body.get("message", text)), body.get("detail")
    )


async def iter_lines(
    response: aiohttp.ClientResponse, idle_timeout_s: float
) -> AsyncIterator[dict[str, Any]]:
    """Decode an NDJSON or SSE response body into JSON objects as they arrive."""
    sse = response.headers.get("Content-Type", "").startswith("text/event-stream")
    event = "message"
    while True:
        try:
            raw = await asyncio.wait_for(response.content.readline(), idle_timeout_s)
        except TimeoutError as exc:
            raise CornserveError(504, "timeout", f"no data from the gateway for {idle_timeout_s} s") from exc
        if not raw:
            return
        line = raw.decode().rstrip("\r\n")
        if not line:
            event = "message"
            continue
        if sse:
            if line.startswith("event:"):
                event = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue
            line = line[5:].strip()
            if event == "end":
                return
        item = json.loads(line)
        if (sse and event == "error") or (isinstance(item, dict) and "error" in item and "message" in item):
            raise CornserveError(
                502, str(item.get("error", "error")), str(item.get("message", item)), item.get("detail")
            )
        yield item


class CornserveClient:
    """Apps, tasks and task libraries of one cluster (one gateway URL).

    `token` is the bearer token sent with every request; without one it is looked up as
    `cornserve.client.auth.resolve_token` says (environment, then the local state dir). `ca_file`
    (or ``$CORNSERVE_CA_FILE``) is the CA an HTTPS gateway's certificate chains to, when it is not one
    the system trusts (a self-signed certificate is its own CA).
    """

    def __init__(
        self,
        url: str | None = None,
        timeout_s: float = 900.0,
        *,
        token: str | None = None,
        state_dir: str | Path | None = None,
        ca_file: str | Path | None = None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.timeout_s = timeout_s
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self.token = resolve_token(self.url, token, self._state_dir)
        self._ssl = client_ssl_context(ca_file)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CornserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        """The shared HTTP session (created lazily)."""
        if self._http is None or self._http.closed:
            headers = {} if self.token is None else {"Authorization": f"Bearer {self.token.value}"}
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
            )
        return self._http

    def _auth_help(self, status: int) -> str:
        return auth_hint(status, self.token, self._state_dir)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._http is not None:
            await self._http.close()

    async def call(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> Any:
        """One JSON request; returns the decoded JSON reply."""
        try:
            async with self.http.request(
                method,
                self.url + path,
                json=body,
                timeout=aiohttp.ClientTimeout(total=timeout_s or self.timeout_s),
            ) as response:
                await raise_for_error(response, self._auth_help(response.status))
                return await response.json()
        except aiohttp.ClientConnectionError as exc:
            raise CornserveError(
                503, "unreachable", f"cannot reach the gateway at {self.url}: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise CornserveError(
                504, "timeout", f"{method} {path} did not finish in {timeout_s or self.timeout_s} s"
            ) from exc

    async def stream(
        self,
        method: str,
        path: str,
        body: Any = None,
        accept: str = "application/x-ndjson",
        idle_timeout_s: float = 300.0,
    ) -> AsyncIterator[dict[str, Any]]:
        """A request whose reply is streamed (NDJSON or SSE); yields JSON objects as they arrive.

        A non-streamed JSON reply is yielded as one object.
        """
        try:
            async with self.http.request(
                method, self.url + path, json=body, headers={"Accept": accept}
            ) as response:
                await raise_for_error(response, self._auth_help(response.status))
                content_type = response.headers.get("Content-Type", "")
                if content_type.startswith("application/json"):
                    yield await response.json()
                    return
                async for item in iter_lines(response, idle_timeout_s):
                    yield item
        except aiohttp.ClientConnectionError as exc:
            raise CornserveError(
                503, "unreachable", f"cannot reach the gateway at {self.url}: {exc}"
            ) from exc

    # ----- the API ---------------------------------------------------------------------------------

    async def health(self) -> Health:
        """GET /health (raises CornserveError 503 when degraded)."""
        return Health.model_validate(await self.call("GET", "/health", timeout_s=30))

    async def register_app(self, name: str, source: str) -> AsyncIterator[ProgressEvent | AppSummary]:
        """Register an app, yielding deployment progress events and finally the app."""
        async for event in self.stream(
            "POST",
            "/apps",
            AppRegistration(name=name, source=source).model_dump(),
            accept="text/event-stream",
            idle_timeout_s=self.timeout_s,
        ):
            if isinstance(event, dict) and "stage" in event:
                yield ProgressEvent.model_validate(event)
            else:
                yield AppSummary.model_validate(event)

    async def list_apps(self) -> list[AppSummary]:
        """GET /apps."""
        return _APPS.validate_python(await self.call("GET", "/apps"))

    async def get_app(self, name: str) -> AppDetail:
        """GET /apps/{name}."""
        return AppDetail.model_validate(await self.call("GET", f"/apps/{name}"))

    async def app_graph(self, name: str, request: Any) -> AppGraph:
        """POST /apps/{name}/graph: the task graphs the registered app sends for `request`, as Mermaid."""
        return AppGraph.model_validate(await self.call("POST", f"/apps/{name}/graph", request))

    async def unregister_app(self, name: str) -> AppRemoval:
        """DELETE /apps/{name}."""
        return AppRemoval.model_validate(await self.call("DELETE", f"/apps/{name}"))

    async def invoke_app(self, name: str, request: Any) -> AsyncIterator[dict[str, Any]]:
        """POST /apps/{name}/invoke: yields the response (once) or each streamed item.

        The items are the app's own response model as JSON (the client does not know its class).
        """
        async for item in self.stream("POST", f"/apps/{name}/invoke", request):
            yield item

    async def list_tasks(self) -> TaskListing:
        """GET /tasks."""
        return TaskListing.model_validate(await self.call("GET", "/tasks"))

    async def scale_task(self, key: str, num_executors: int) -> DeploymentInfo:
        """POST /tasks/{key}/scale."""
        body = ScaleBody(num_executors=num_executors).model_dump()
        return DeploymentInfo.model_validate(await self.call("POST", f"/tasks/{key}/scale", body))

    async def add_tasklib(self, name: str, source: str) -> TaskLibrary:
        """POST /tasklibs."""
        body = TaskLibraryUpload(name=name, source=source).model_dump()
        return TaskLibrary.model_validate(await self.call("POST", "/tasklibs", body))

    async def list_tasklibs(self) -> list[TaskLibrary]:
        """GET /tasklibs."""
        return _LIBRARIES.validate_python(await self.call("GET", "/tasklibs"))


_APPS = TypeAdapter(list[AppSummary])
_LIBRARIES = TypeAdapter(list[TaskLibrary])
