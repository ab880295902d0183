"""The gateway's auth settings on real processes, the route-scope table, and the launcher's token file."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from aiohttp import web
from tests.support.cluster import ProcessCluster
from tests.support.processes import python_module
from tests.support.waiting import wait_log

from cornserve.cli.admintoken import ensure_admin_token
from cornserve.cli.natsserver import NatsServerProcess
from cornserve.gateway.auth import (
    ROUTE_SCOPES,
    AuthConfigError,
    Credentials,
    UnscopedRouteError,
    check_route_scopes,
)
from cornserve.gateway.routes import Gateway
from cornserve.runtime.process import free_port
from cornserve.runtime.secrets import SecretFileError, new_token, write_secret_file

TOKEN = new_token()


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    return {
        (r.method, r.resource.canonical) for r in app.router.routes() if r.resource and r.method != "HEAD"
    }


def test_every_route_of_the_gateway_has_exactly_one_declared_scope() -> None:
    # Building the application runs the check; no state is needed to list the routes.
    app = Gateway.__new__(Gateway).app(Credentials.from_tokens(TOKEN))
    assert routes_of(app) == set(ROUTE_SCOPES), "ROUTE_SCOPES and the route table disagree"


async def ok(request: web.Request) -> web.Response:
    return web.Response()


def test_a_route_without_a_scope_is_refused() -> None:
    app = web.Application()
    app.router.add_get("/health", ok)
    app.router.add_post("/apps/{name}/debug", ok)
    with pytest.raises(UnscopedRouteError, match=r"POST /apps/\{name\}/debug"):
        check_route_scopes(app)


def test_credentials_refuse_short_tokens_and_tell_scopes_apart() -> None:
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        Credentials.from_tokens("admin")
    key = new_token()
    with pytest.raises(AuthConfigError, match=r"entry\(ies\) \[2\]"):
        Credentials.from_tokens(TOKEN, [key, "short"])
    credentials = Credentials.from_tokens(TOKEN, [key])
    assert credentials.scopes_of(TOKEN) == {"admin", "invoke"}
    assert credentials.scopes_of(key) == {"invoke"}
    assert credentials.scopes_of(key + "x") == frozenset() and credentials.scopes_of("") == frozenset()
    assert TOKEN not in repr(credentials)


def gateway(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`cornserve-gateway` run to its exit, with only `env` as its CORNSERVE_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CORNSERVE_")}
    return subprocess.run(
        python_module("cornserve.gateway.main", *args),
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_gateway_without_an_admin_token_refuses_to_start() -> None:
    out = gateway("--port", str(free_port()))
    assert out.returncode == 2, out.stderr
    assert "needs an admin token: set CORNSERVE_ADMIN_TOKEN or pass --admin-token-file" in out.stderr


def test_tls_needs_both_the_certificate_and_the_key(tmp_path: Path) -> None:
    out = gateway("--tls-cert", str(tmp_path / "c.pem"), CORNSERVE_ADMIN_TOKEN=TOKEN)
    assert out.returncode == 2 and "--tls-cert and --tls-key go together" in out.stderr, out.stderr


def test_a_short_or_unsafe_token_stops_the_gateway(private_nats: NatsServerProcess, tmp_path: Path) -> None:
    nats = {"CORNSERVE_NATS_URL": private_nats.url}
    out = gateway("--port", str(free_port()), CORNSERVE_ADMIN_TOKEN="guessable-1", **nats)
    assert out.returncode == 1 and "shorter than 16 characters" in out.stderr, out.stderr
    assert "guessable-1" not in out.stderr
    token_file = write_secret_file(tmp_path / "admin-token", TOKEN)
    token_file.chmod(0o644)
    out = gateway("--port", str(free_port()), "--admin-token-file", str(token_file), **nats)
    assert out.returncode == 1 and "accessible by other users" in out.stderr, out.stderr


def test_listening_beyond_loopback_without_tls_warns(private_nats: NatsServerProcess, tmp_path: Path) -> None:
    with ProcessCluster(tmp_path, private_nats.url) as processes:
        proc = processes.start_service(
            "gateway",
            python_module("cornserve.gateway.main", "--host", "0.0.0.0", "--port", str(free_port())),
            {"CORNSERVE_NATS_URL": private_nats.url, "CORNSERVE_ADMIN_TOKEN": TOKEN},
        )
        wait_log(proc, "gateway listening on http://0.0.0.0:")
        assert "WARNING" in proc.log() and "without TLS: bearer tokens" in proc.log()
        assert TOKEN not in proc.log()


def test_the_launcher_token_is_generated_once_private_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORNSERVE_ADMIN_TOKEN", raising=False)
    first = ensure_admin_token(tmp_path)
    assert first.file == tmp_path / "admin-token" and first.where.endswith("(new)")
    assert stat.S_IMODE(first.file.stat().st_mode) == 0o600
    again = ensure_admin_token(tmp_path)
    assert again.value == first.value and again.file == first.file and not again.where.endswith("(new)")
    assert first.value not in repr(first)
    monkeypatch.setenv("CORNSERVE_ADMIN_TOKEN", TOKEN)
    from_env = ensure_admin_token(tmp_path)
    assert (from_env.value, from_env.file) == (TOKEN, None)
    monkeypatch.delenv("CORNSERVE_ADMIN_TOKEN")
    first.file.chmod(0o640)
    with pytest.raises(SecretFileError, match="chmod 600"):
        ensure_admin_token(tmp_path)


@pytest.mark.parametrize("command", ["up", "demo"])
def test_up_and_demo_take_the_tls_pair_together(command: str, tmp_path: Path) -> None:
    out = subprocess.run(
        python_module("cornserve.cli.main", command, "--state-dir", str(tmp_path), "--tls-key", "k.pem"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2 and "--tls-cert and --tls-key go together" in out.stderr, out.stderr
    assert not (tmp_path / "admin-token").exists()
