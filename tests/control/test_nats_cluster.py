"""A NATS cluster as `cornserve up --nats-cluster 3` runs it, without the services (a few seconds).

Three routed nats-server processes with the generated per-role authentication: the KV buckets get
three replicas, a client given the comma-separated server list connects through any live server,
and the buckets stay readable and writable with one server killed. The whole `up` with services on
such a cluster is tests/control/test_nats_cluster_up.py (marker `slow`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client

from cornserve.bus.control import KV_APPS, KV_DEPLOYMENTS, KV_TASKLIBS, AppRecord
from cornserve.bus.kv import KV_WRITE_RETRY_S, kv_get, kv_put, open_bucket
from cornserve.cli.natsauth import ADMIN, GATEWAY, NatsAuth, create_buckets
from cornserve.cli.natscluster import NatsCluster, check_cluster_size
from cornserve.runtime.nats import connect_nats, nats_servers
from cornserve.runtime.process import free_port
from cornserve.runtime.settings import ServiceSettings, parse_settings

DEADLINE_S = 20.0


def app(name: str) -> AppRecord:
    return AppRecord(name=name, source="x = 1", state="ready", created_at=1.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsCluster, NatsAuth]]:
    """Three servers with `up`'s authentication and sync interval; buckets created as `up` does."""
    base = tmp_path_factory.mktemp("nats-cluster")
    auth = NatsAuth.generate(base / "auth")
    servers = NatsCluster(3, base, config_file=auth.server_config, sync_interval="1s")
    servers.start()
    try:
        create_buckets(servers.url, auth.creds(ADMIN), replicas=servers.replicas)
        yield servers, auth
    finally:
        servers.stop()


def test_settings_take_a_comma_separated_server_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORNSERVE_NATS_URL", " nats://a:1, nats://b:2,,nats://c:3 ")
    assert parse_settings(ServiceSettings, []).nats_url == "nats://a:1,nats://b:2,nats://c:3"
    flag = parse_settings(ServiceSettings, ["--nats-url", "nats://x:1,tls://y:2"]).nats_url
    assert nats_servers(flag) == ["nats://x:1", "tls://y:2"]
    with pytest.raises(SystemExit) as exc:
        parse_settings(ServiceSettings, ["--nats-url", "nats://a:1,http://b:2"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="no NATS server URL"):
        nats_servers(" , ")


def test_cluster_size_is_one_or_an_odd_quorum() -> None:
    assert [check_cluster_size(n) for n in (1, 3, 5)] == [1, 3, 5]
    for bad in (0, 2, 4, 9):
        with pytest.raises(ValueError, match="--nats-cluster"):
            check_cluster_size(bad)


async def test_connect_uses_every_server_of_the_list(cluster: tuple[NatsCluster, NatsAuth]) -> None:
    servers, auth = cluster
    dead = f"nats://127.0.0.1:{free_port()}"  # nothing listens there: the client must try the others
    nc = await connect_nats(f"{dead},{servers.urls[2]}", name="list-test", creds=auth.creds(GATEWAY))
    try:
        assert nc.connected_url is not None and nc.connected_url.port == servers.servers[2].port
        assert len(nc.servers) >= 2  # the given list (and the servers the cluster announced)
    finally:
        await nc.close()


async def _streams(nc: Client) -> dict[str, tuple[int, list[str]]]:
    infos = await nc.jetstream(timeout=5.0).streams_info()
    return {
        i.config.name: (
            i.config.num_replicas or 1,
            [p.name for p in (i.cluster.replicas or [])] if i.cluster else [],
        )
        for i in infos
    }


@pytest.mark.slow
async def test_buckets_have_three_replicas_and_survive_one_server(
    cluster: tuple[NatsCluster, NatsAuth],
) -> None:
    servers, auth = cluster
    assert servers.replicas == 3
    nc = await connect_nats(servers.url, name="replicas-test", creds=auth.creds(ADMIN))
    streams = await _streams(nc)
    for bucket in (KV_APPS, KV_TASKLIBS, KV_DEPLOYMENTS):
        replicas, peers = streams[f"KV_{bucket}"]
        assert replicas == 3 and len(peers) == 2, streams  # a leader and two followers
    info = await nc.jetstream(timeout=5.0).stream_info(f"KV_{KV_APPS}")
    assert info.cluster is not None and info.cluster.leader is not None
    victim = servers.server(info.cluster.leader)  # the bucket must elect a new leader: writes wait
    try:
        kv = await open_bucket(nc, KV_APPS)
        await kv_put(kv, "before", app("before"))

        victim.kill()  # kill -9: two of three keep the quorum
        # kv_put rides out the stream leader's re-election (it retries transient failures, bounded).
        await asyncio.wait_for(kv_put(kv, "during", app("during")), KV_WRITE_RETRY_S + 10)
        assert await kv_get(kv, "before", AppRecord) == app("before")
        assert await kv_get(kv, "during", AppRecord) == app("during")
    finally:
        victim.start()  # back on its ports and store; it rejoins through its routes
        await nc.close()
    nc = await connect_nats(victim.url, name="rejoin-test", creds=auth.creds(ADMIN))
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:  # the restarted server catches up: it serves the value written while it was down
            try:
                kv = await open_bucket(nc, KV_APPS)
                info = await nc.jetstream(timeout=2.0).stream_info(f"KV_{KV_APPS}")
                current = info.cluster is not None and all(p.current for p in info.cluster.replicas or [])
                if current and await kv_get(kv, "during", AppRecord) == app("during"):
                    break
            except (TimeoutError, nats.errors.Error):
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise AssertionError(f"{victim.name} did not catch up within {DEADLINE_S} s")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


def test_single_server_is_unchanged(tmp_path: Path) -> None:
    servers = NatsCluster(1, tmp_path)
    assert [s.name for s in servers.servers] == ["nats"] and servers.servers[0].cluster is None
    assert servers.url == servers.urls[0] and servers.replicas == 1
    assert servers.servers[0].store_dir == tmp_path / "nats"
