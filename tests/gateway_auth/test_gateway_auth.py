"""Gateway auth on a real HTTPS cluster: scopes per route, 401/403 bodies, and no app code before auth.

The cluster (conftest) serves a self-signed certificate and accepts two API keys; its admin token is
the one `cornserve up` generated into the state dir. Every request here crosses a real TLS socket.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.gateway_auth.conftest import Certificate
from tests.support.cluster import gateway_session
from tests.support.tasklibs import ECHO

from cornserve.cli.launcher import LocalCluster
from cornserve.client import CornserveAuthError, CornserveClient
from cornserve.gateway.auth import ROUTE_SCOPES

ECHO_APP = """
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve_tasklibs.cs_test_echo import EchoInput, EchoTask

echo = EchoTask(label="auth")

class Config(AppConfig):
    tasks = {"echo": echo}

class Request(BaseModel):
    text: str

class Response(BaseModel):
    text: str

async def serve(request: Request) -> Response:
    return Response(text=(await echo(EchoInput(text=request.text))).text)
"""

WRITES_AT_IMPORT = """
from pathlib import Path
Path({path!r}).write_text("the app's code ran in the gateway")
"""

PATH_VALUES = {"name": "nope", "key": "nope-123", "id": "nope"}


def concrete(path: str) -> str:
    """A route path with its placeholders filled in."""
    return re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)


async def call(
    http: aiohttp.ClientSession, method: str, path: str, body: Any = None
) -> tuple[int, Any, Mapping[str, str]]:
    """(status, JSON body, headers) of one request."""
    async with http.request(method, path, json=body) as response:
        return response.status, await response.json(), response.headers


async def _register_echo(cluster: LocalCluster) -> None:
    async with gateway_session(cluster, timeout_s=300) as admin:
        status, body, _ = await call(admin, "POST", "/tasklibs", {"name": ECHO.name, "source": ECHO.source})
        assert status == 201, body
        status, body, _ = await call(admin, "POST", "/apps", {"name": "echo", "source": ECHO_APP})
        assert status == 201, body


async def _unregister_echo(cluster: LocalCluster) -> None:
    async with gateway_session(cluster, timeout_s=300) as admin:
        status, body, _ = await call(admin, "DELETE", "/apps/echo")
        assert status == 200, body


@pytest.fixture(scope="module")
def echo_app(cluster: LocalCluster) -> Iterator[str]:
    """The echo library uploaded and app 'echo' registered with the admin token (unregistered after)."""
    asyncio.run(_register_echo(cluster))
    yield "echo"
    asyncio.run(_unregister_echo(cluster))


async def test_health_is_open_and_every_other_route_needs_a_token(
    cluster: LocalCluster, api_keys: tuple[str, str]
) -> None:
    assert cluster.url.startswith("https://")
    async with gateway_session(cluster, timeout_s=60, anonymous=True) as anonymous:
        status, body, _ = await call(anonymous, "GET", "/health")
        assert status == 200 and body["status"] == "ok", body
        for (method, path), scope in ROUTE_SCOPES.items():
            if scope == "open":
                continue
            status, body, headers = await call(anonymous, method, concrete(path), {})
            assert status == 401, (method, path, body)
            if path.startswith("/v1/"):  # the OpenAI-compatible routes answer in OpenAI's error shape
                error = body["error"]
                assert error["code"] == "unauthorized" and error["type"] == "authentication_error", body
                assert "Authorization: Bearer" in error["message"], body
            else:
                assert body["error"] == "unauthorized" and "Authorization: Bearer" in body["message"], body
            assert headers["WWW-Authenticate"] == 'Bearer realm="cornserve"'
        # A path no route matches is not answered 404 to a stranger either.
        assert (await call(anonymous, "GET", "/no/such/route"))[0] == 401
    for wrong in ("Bearer " + "x" * 43, f"Basic {api_keys[0]}", f"Bearer{api_keys[0]}"):
        async with (
            gateway_session(cluster, timeout_s=60, anonymous=True) as anonymous,
            anonymous.get("/tasks", headers={"Authorization": wrong}) as response,
        ):
            assert response.status == 401, wrong
            if wrong.startswith("Bearer "):
                assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_an_api_key_invokes_but_gets_403_on_every_admin_route(
    cluster: LocalCluster, echo_app: str, api_keys: tuple[str, str]
) -> None:
    for key in api_keys:
        async with gateway_session(cluster, timeout_s=120, token=key) as user:
            status, body, _ = await call(user, "POST", f"/apps/{echo_app}/invoke", {"text": "hi"})
            assert (status, body) == (200, {"text": "hi"})
            status, body, _ = await call(user, "GET", "/openapi.json")
            assert status == 200 and "/apps/echo/invoke" in body["paths"], body
            # An invoke key reaches the route itself: a missing app is the app's 404, not an auth error.
            assert (await call(user, "POST", "/apps/missing/invoke", {}))[0] == 404
            for (method, path), scope in ROUTE_SCOPES.items():
                if scope != "admin":
                    continue
                status, body, headers = await call(user, method, concrete(path), {})
                assert status == 403, (method, path, body)
                assert body["error"] == "forbidden" and "admin token" in body["message"], body
                assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]


async def test_the_admin_token_holds_both_scopes(cluster: LocalCluster, echo_app: str) -> None:
    async with gateway_session(cluster, timeout_s=120) as admin:
        status, body, _ = await call(admin, "GET", "/apps")
        assert status == 200 and [a["name"] for a in body] == [echo_app], body
        for path in (f"/apps/{echo_app}", "/tasks", "/tasklibs", "/openapi.json"):
            assert (await call(admin, "GET", path))[0] == 200, path
        status, body, _ = await call(admin, "POST", f"/apps/{echo_app}/invoke", {"text": "admin"})
        assert (status, body) == (200, {"text": "admin"})
        status, session, _ = await call(admin, "POST", "/sessions", {"ttl_s": 30})
        assert status == 201, session
        assert (await call(admin, "DELETE", f"/sessions/{session['session_id']}"))[0] == 200


async def test_unauthenticated_register_is_refused_before_the_app_code_runs(
    cluster: LocalCluster, tmp_path: Path, api_keys: tuple[str, str]
) -> None:
    marker = tmp_path / "app-code-ran"
    source = WRITES_AT_IMPORT.format(path=str(marker)) + ECHO_APP
    body = {"name": "writes-at-import", "source": source}
    async with gateway_session(cluster, timeout_s=120, anonymous=True) as anonymous:
        status, reply, _ = await call(anonymous, "POST", "/apps", body)
        assert status == 401, reply
    async with gateway_session(cluster, timeout_s=120, token=api_keys[0]) as user:
        status, reply, _ = await call(user, "POST", "/apps", body)
        assert status == 403, reply
    assert not marker.exists(), "the gateway ran the app's code for a caller without the admin token"
    # The probe works: the same source sent with the admin token does run (and is then removed).
    async with gateway_session(cluster, timeout_s=300) as admin:
        status, reply, _ = await call(
            admin, "POST", "/apps", {**body, "source": source.replace(ECHO_APP, "")}
        )
        assert status == 400 and reply["error"] == "invalid_app", reply
    assert marker.exists()


def test_the_admin_token_file_is_private(cluster: LocalCluster) -> None:
    path = cluster.state_dir / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == cluster.admin_token and len(cluster.admin_token) >= 32


async def test_the_client_finds_the_token_and_explains_refusals(
    cluster: LocalCluster,
    certificate: Certificate,
    echo_app: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    api_keys: tuple[str, str],
) -> None:
    async with CornserveClient(cluster.url, state_dir=cluster.state_dir, ca_file=certificate.cert) as client:
        assert client.token is not None and client.token.source == str(cluster.state_dir / "admin-token")
        assert [a.name for a in await client.list_apps()] == [echo_app]
    monkeypatch.setenv("CORNSERVE_API_KEY", api_keys[1])
    async with CornserveClient(cluster.url, state_dir=cluster.state_dir, ca_file=certificate.cert) as client:
        assert [item async for item in client.invoke_app(echo_app, {"text": "key"})] == [{"text": "key"}]
        with pytest.raises(CornserveAuthError) as refused:
            await client.list_apps()
        assert (
            refused.value.status == 403 and "$CORNSERVE_API_KEY may only invoke apps" in refused.value.message
        )
    monkeypatch.delenv("CORNSERVE_API_KEY")
    async with CornserveClient(cluster.url, state_dir=tmp_path, ca_file=certificate.cert) as client:
        assert client.token is None
        with pytest.raises(CornserveAuthError) as refused:
            await client.list_apps()
        assert refused.value.status == 401 and "no token was sent" in refused.value.message
        assert "CORNSERVE_ADMIN_TOKEN" in refused.value.message


def test_the_state_dir_token_goes_only_to_a_local_gateway(cluster: LocalCluster) -> None:
    """Pointing the client at another host never sends it this machine's admin token."""
    local = CornserveClient(cluster.url, state_dir=cluster.state_dir)
    remote = CornserveClient("https://gateway.example:8000", state_dir=cluster.state_dir)
    assert local.token is not None and remote.token is None


def test_the_cli_over_https_with_the_state_dir_token(
    cluster: LocalCluster, certificate: Certificate, echo_app: str, tmp_path: Path, api_keys: tuple[str, str]
) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("CORNSERVE_ADMIN_TOKEN", "CORNSERVE_API_KEY")}
    env = {**base, "CORNSERVE_URL": cluster.url, "CORNSERVE_CA_FILE": str(certificate.cert)}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cornserve.cli.main", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    out = cli("apps", "--state-dir", str(cluster.state_dir))
    assert out.returncode == 0 and echo_app in out.stdout, out.stdout + out.stderr
    out = cli(
        "invoke",
        echo_app,
        '{"text": "cli"}',
        CORNSERVE_API_KEY=api_keys[0],
        CORNSERVE_STATE_DIR=str(tmp_path),
    )
    assert out.returncode == 0 and '"cli"' in out.stdout, out.stderr
    out = cli("apps", CORNSERVE_STATE_DIR=str(tmp_path))
    assert out.returncode == 1 and "401" in out.stderr and "CORNSERVE_ADMIN_TOKEN" in out.stderr, out.stderr


def test_plain_http_to_the_https_gateway_fails(cluster: LocalCluster) -> None:
    plain = cluster.url.replace("https://", "http://")
    out = subprocess.run(
        [sys.executable, "-m", "cornserve.cli.main", "status", "--url", plain],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1, out.stdout + out.stderr
