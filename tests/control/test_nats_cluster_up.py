"""`cornserve up --nats-cluster 3` serves through the loss of any one NATS server (marker `slow`).

A whole local cluster on three routed nats-servers (KV buckets with three replicas) under a steady
load of app requests, with `up`'s supervisor running: one server is killed with SIGKILL (first one
that is not `cluster.json`'s `nats_url`, then that first one too). Every request ends (each has a
deadline), requests keep being answered, apps can still be registered and listed (KV writes and
reads), the supervisor restarts the dead server and it rejoins (its replicas catch up). The printed
numbers (run with -s) are the ones docs/reliability.md quotes.

One cluster of its own (NATS servers are killed), not the directory's shared one.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats.errors
import pytest
from tests.control.apps import SUM_APP
from tests.control.support import admin_nats, call, ensure_tasklib, make_matrix_tensor
from tests.support.cluster import ProcessCluster, gateway_session

from cornserve.bus.control import KV_APPS, KV_DEPLOYMENTS, KV_TASKLIBS
from cornserve.cli.launcher import STATE_FILE, LocalCluster
from cornserve.cli.natsserver import NatsServerProcess

REQUEST_DEADLINE_S = 90.0
"""Each request's own deadline: a request that would hang fails the test instead. Above the sidecar
client's 60 s wait (`cornserve.sidecar.client.DEFAULT_TIMEOUT_S`): a sidecar message lost with the
killed server's connections (core NATS delivers at most once) ends its request only then."""
LOAD_S = 12.0
"""How long the load runs after each kill (the restart and rejoin happen within it)."""
REJOIN_DEADLINE_S = 60.0
CONCURRENCY = 4
KILL_AFTER_S = 1.0
LOST_WINDOW_S = 1.0
"""Only a request in flight at the kill (or sent before the clients noticed it, within this window)
may lose a message with the killed server's connections; it ends with a clean error at the deadline
of whoever waited for that message (the dispatcher's 10 s route timeout, the sidecar client's 60 s)."""


@dataclass
class Load:
    """Outcomes of the requests of one load phase: (start offset from the kill, seconds, status)."""

    results: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def failed(self) -> list[tuple[float, float, int]]:
        return [r for r in self.results if r[2] != 200]

    def summary(self) -> str:
        latencies = sorted(r[1] for r in self.results)
        failed = ", ".join(
            f"{status} after {took:.1f} s (started at {at:+.1f} s)" for at, took, status in self.failed
        )
        worst = latencies[-1] if latencies else float("nan")
        p50 = latencies[len(latencies) // 2] if latencies else float("nan")
        return (
            f"{len(self.results)} requests, {len(self.failed)} not ok [{failed}], "
            f"median {p50 * 1000:.0f} ms, slowest {worst * 1000:.0f} ms"
        )


async def _invoke(http: aiohttp.ClientSession, seed: int) -> int:
    async with asyncio.timeout(REQUEST_DEADLINE_S):
        status, body = await call(http, "POST", "/apps/sums/invoke", {"seed": seed})
    if status == 200:
        expected = float(make_matrix_tensor(seed, 3, 3).sum())
        assert body["sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4), body
    return status


async def _load(local: LocalCluster, started: float, stop_at: float, load: Load, worker: int) -> None:
    async with gateway_session(local, timeout_s=REQUEST_DEADLINE_S) as http:
        seed = worker * 100_000
        while time.monotonic() < stop_at:
            seed += 1
            t0 = time.monotonic()
            try:
                status = await _invoke(http, seed)
            except (TimeoutError, aiohttp.ClientError):
                status = -1  # no answer within the deadline: recorded, and the test fails on it
            load.results.append((t0 - started, time.monotonic() - t0, status))


async def _rejoined(
    local: LocalCluster, server: NatsServerProcess, killed: float, old_pid: int
) -> tuple[float, float]:
    """Seconds from the kill until `server` ran again (restarted), and until every bucket's replicas are current."""
    nc = await admin_nats(local)
    restarted: float | None = None
    try:
        while True:
            if time.monotonic() - killed > REJOIN_DEADLINE_S:
                raise AssertionError(f"{server.name} did not rejoin within {REJOIN_DEADLINE_S} s")
            if restarted is None and server.running and server.pid != old_pid:
                restarted = time.monotonic() - killed
            try:
                if restarted is not None:
                    peers = []
                    for bucket in (KV_APPS, KV_TASKLIBS, KV_DEPLOYMENTS):
                        info = await nc.jetstream(timeout=2.0).stream_info(f"KV_{bucket}")
                        assert info.cluster is not None
                        peers += [(info.cluster.leader, True)]
                        peers += [
                            (p.name, bool(p.current) and not p.offline) for p in info.cluster.replicas or []
                        ]
                    if all(ok for name, ok in peers) and server.name in {name for name, _ in peers}:
                        return restarted, time.monotonic() - killed
            except (TimeoutError, nats.errors.Error):
                pass  # a stream leader election in progress: ask again
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _kill_under_load(local: LocalCluster, victim: NatsServerProcess, said: list[str], app: str) -> Load:
    """Kill `victim` while CONCURRENCY clients invoke; register app `app` while it is down."""
    load = Load()
    started = time.monotonic()
    stop_at = started + LOAD_S
    workers = [asyncio.create_task(_load(local, started, stop_at, load, w + 1)) for w in range(CONCURRENCY)]
    await asyncio.sleep(KILL_AFTER_S)  # the load runs before the kill too
    pid = victim.pid
    assert pid is not None
    victim.kill()
    killed = time.monotonic()
    rejoined = asyncio.create_task(_rejoined(local, victim, killed, pid))  # measured from the kill on
    # KV writes (the apps bucket) and reads while the server is down or just back.
    async with gateway_session(local, timeout_s=REQUEST_DEADLINE_S) as http:
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            status, body = await call(http, "POST", "/apps", {"name": app, "source": SUM_APP})
        assert status == 201, body
        register_s = time.monotonic() - killed
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            status, body = await call(http, "GET", "/apps")
        assert status == 200 and app in {a["name"] for a in body}, body
    restart_s, rejoin_s = await rejoined
    assert any(f"restarting NATS server {victim.name}" in line for line in said), said
    async with asyncio.timeout(LOAD_S + REQUEST_DEADLINE_S + 5):
        await asyncio.gather(*workers)
    kill_at = killed - started
    load.results = [(at - kill_at, took, status) for at, took, status in load.results]  # relative to the kill
    after = [r for r in load.results if r[0] + r[1] >= 0]  # in flight at the kill, or later
    later = [r for r in load.results if r[0] > 0]
    print(
        f"\n{victim.name} killed: {load.summary()}; in flight at the kill or later: {Load(after).summary()}; "
        f"sent after the kill: {Load(later).summary()}; "
        f"app registered {register_s:.2f} s after the kill; restarted after {restart_s:.2f} s, "
        f"its bucket replicas current after {rejoin_s:.2f} s"
    )
    async with gateway_session(local, timeout_s=REQUEST_DEADLINE_S) as http:
        # New requests succeed once the load is over, even when every worker spent the phase in a
        # request that lost a message with the killed server (each waits out its 60 s deadline).
        assert await _invoke(http, 424_242) == 200
    return load


@pytest.mark.slow
async def test_up_with_three_nats_servers_serves_through_losing_one(tmp_path: Path) -> None:
    said: list[str] = []
    with ProcessCluster(tmp_path / "logs") as processes:
        local = await asyncio.to_thread(
            processes.start_local, tmp_path / "state", cpu_slots=2, dispatchers=2, nats_cluster=3
        )
        local.say = said.append
        assert local.nats_servers is not None and len(local.nats_servers.servers) == 3
        state = json.loads((tmp_path / "state" / STATE_FILE).read_text())
        assert state["nats_urls"] == local.nats_servers.urls and state["nats_url"] == state["nats_urls"][0]
        assert local.nats_url == ",".join(state["nats_urls"])  # what every service was handed
        for name in ("nats-0", "nats-1", "nats-2"):
            assert (tmp_path / "state" / "logs" / f"{name}.log").exists()
            assert (tmp_path / "state" / "nats" / name).is_dir()
        nc = await admin_nats(local)
        try:
            for bucket in (KV_APPS, KV_TASKLIBS, KV_DEPLOYMENTS):
                info = await nc.jetstream(timeout=5.0).stream_info(f"KV_{bucket}")
                assert info.config.num_replicas == 3, info
        finally:
            await nc.close()

        async with gateway_session(local, timeout_s=300) as http:
            await ensure_tasklib(http)
            status, body = await call(http, "POST", "/apps", {"name": "sums", "source": SUM_APP})
            assert status == 201, body
            assert await _invoke(http, 1) == 200

        stop = threading.Event()
        result: list[int] = []
        watcher = threading.Thread(target=lambda: result.append(local.supervise(stop.is_set, poll_s=0.2)))
        watcher.start()
        try:
            first = local.nats_servers.server("nats-0")
            assert first.url == state["nats_url"]
            loads = [
                await _kill_under_load(local, local.nats_servers.server("nats-1"), said, "sums-b"),
                await _kill_under_load(local, first, said, "sums-c"),
            ]
        finally:
            stop.set()
            watcher.join(timeout=30)
        assert result == [0], said
        for load in loads:
            assert load.results, "no request ran"
            assert all(status != -1 for _, _, status in load.results), load.summary()  # none hung
            # A request whose messages crossed the killed server may end in a clean error; later ones succeed.
            assert all(at <= LOST_WINDOW_S and status >= 500 for at, _, status in load.failed), load.summary()
        async with gateway_session(local, timeout_s=REQUEST_DEADLINE_S) as http:
            assert await _invoke(http, 7) == 200
