"""`cornserve deploy init`: the secrets of a container deployment, made once and kept, and a NATS
config that a real nats-server starts with and that admits exactly the generated roles."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from cornserve.cli.deploy import NATS_CONFIG, init_state
from cornserve.cli.main import main
from cornserve.cli.natsauth import ADMIN, AUTH_DIR, BUCKETS, GATEWAY, ROLES, NatsAuth
from cornserve.cli.natsserver import NatsServerProcess
from cornserve.runtime.nats import NatsAuthError, connect_nats


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_owner_only_secrets_once_and_keeps_them(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert main(["deploy", "init", "--state-dir", str(state)]) == 0
    auth = NatsAuth(state / AUTH_DIR)
    secrets = [state / "admin-token", auth.server_config, *(auth.creds(role) for role in ROLES)]
    assert all(mode(p) == 0o600 for p in secrets), {p.name: oct(mode(p)) for p in secrets}
    assert mode(auth.directory) == 0o700
    before = {p: p.read_text() for p in secrets}
    assert (auth.directory / NATS_CONFIG).read_text().startswith('include "server.conf"\njetstream {')

    assert main(["deploy", "init", "--state-dir", str(state), "--nats-sync-interval", "always"]) == 0
    assert {p: p.read_text() for p in secrets} == before  # a second `up` keeps the cluster's secrets
    assert "sync_interval: always" in (auth.directory / NATS_CONFIG).read_text()


def test_init_refuses_a_malformed_owner(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert (
        main(["deploy", "init", "--state-dir", str(tmp_path), "--owner", "cornserve"]) == 2
    )  # a usage error
    assert "expected UID:GID" in capsys.readouterr().err


async def test_nats_starts_with_the_config_and_admits_only_the_roles(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_state(state, "1s", owner=None, say=lambda *_: None)
    auth = NatsAuth(state / AUTH_DIR)
    with NatsServerProcess(config_file=auth.directory / NATS_CONFIG, store_dir=tmp_path / "js") as server:
        nc = await connect_nats(server.url, name="test-gateway", creds=auth.creds(GATEWAY))
        await nc.close()
        with pytest.raises(NatsAuthError):
            await connect_nats(server.url, name="anonymous", first_connect_deadline_s=5)
        # The admin role creates the KV buckets the services may only read.
        argv = ["deploy", "kv", "--state-dir", str(state), "--nats-url", server.url]
        assert await asyncio.to_thread(main, argv) == 0
        nc = await connect_nats(server.url, name="test-admin", creds=auth.creds(ADMIN))
        try:
            names = {info.config.name for info in await nc.jetstream().streams_info()}
        finally:
            await nc.close()
        assert names == {f"KV_{bucket}" for bucket in BUCKETS}
