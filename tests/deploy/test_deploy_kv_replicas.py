"""`cornserve deploy kv --replicas N` asks JetStream for N replicas (deploy/k8s passes 3 for its 3 servers).

One server cannot hold 3 replicas, so JetStream refuses the buckets and the command fails with the
server's answer within its deadline; with 1 it succeeds (the bucket's config says 1).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cornserve.cli.deploy import NATS_CONFIG, init_state
from cornserve.cli.main import main
from cornserve.cli.natsauth import ADMIN, AUTH_DIR, BUCKETS, NatsAuth
from cornserve.cli.natsserver import NatsServerProcess
from cornserve.runtime.nats import connect_nats


async def test_replicas_reach_jetstream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    init_state(state, "1s", owner=None, say=lambda *_: None)
    auth = NatsAuth(state / AUTH_DIR)
    with NatsServerProcess(config_file=auth.directory / NATS_CONFIG, store_dir=tmp_path / "js") as server:
        base = ["deploy", "kv", "--state-dir", str(state), "--nats-url", server.url]
        assert await asyncio.to_thread(main, [*base, "--replicas", "3", "--timeout", "3"]) == 1
        out = capsys.readouterr().out
        assert "cannot create the KV buckets" in out and "with 3 replica(s)" in out
        assert await asyncio.to_thread(main, [*base, "--replicas", "1"]) == 0
        nc = await connect_nats(server.url, name="test-admin", creds=auth.creds(ADMIN))
        try:
            infos = await nc.jetstream().streams_info()
        finally:
            await nc.close()
        assert {i.config.name: i.config.num_replicas for i in infos} == {f"KV_{b}": 1 for b in BUCKETS}
