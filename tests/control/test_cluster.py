"""End to end: a real local cluster (`LocalCluster`, as `cornserve up` runs it) serving apps over HTTP.

NATS, four sidecars, the resource manager, two dispatchers, the gateway, task managers and
executors are all real processes; tensors cross the sidecars between executors.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client
from tests.control.apps import PIPELINE_APP, SUM_APP
from tests.control.support import (
    TASKLIB,
    admin_nats,
    call,
    ensure_tasklib,
    expected_sum,
    make_matrix_tensor,
    tasks_by_key,
)
from tests.support.waiting import wait_for

from cornserve.bus.control import DISPATCHER_SERVICE_NAME, InvokeKeepalive
from cornserve.cli.launcher import LocalCluster
from cornserve.gateway.discovery import ping_services
from cornserve.runtime.process import pid_alive

DEADLINE = 120.0
ACK_DELAY_ENV = "CORNSERVE_ACK_DELAY"
"""The dispatcher's `--ack-delay` (`cornserve.dispatcher.main.DispatcherSettings`)."""


async def test_lifecycle_through_the_gateway(cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    status, lib = await call(
        http, "POST", "/tasklibs", {"name": "tensor-math", "source": TASKLIB.read_text()}
    )
    assert status == 201, lib
    assert {"MakeMatrix", "MatMul", "Reduce"} <= set(lib["unit_tasks"])

    status, app = await call(http, "POST", "/apps", {"name": "pipeline", "source": PIPELINE_APP})
    assert status == 201, app
    assert app["state"] == "ready" and len(app["tasks"]) == 3

    # 50 concurrent invocations through 3 unit tasks and sidecar forwards, all correct.
    seeds = list(range(50))
    results = await asyncio.gather(
        *(call(http, "POST", "/apps/pipeline/invoke", {"seed": s, "n": 8}) for s in seeds)
    )
    for seed, (status, body) in zip(seeds, results, strict=True):
        assert status == 200, body
        assert body["shape"] == [8, 8]
        assert body["sum"] == pytest.approx(expected_sum(seed, 8), rel=1e-4, abs=1e-3)

    # A failing invocation fails its graph with the executor's message.
    status, body = await call(http, "POST", "/apps/pipeline/invoke", {"seed": 1, "fail": True})
    assert status == 502 and "MatMul" in body["message"], body

    # Bad inputs.
    assert (await call(http, "POST", "/apps/pipeline/invoke", {"seed": "x"}))[0] == 422
    assert (await call(http, "POST", "/apps/nope/invoke", {}))[0] == 404
    status, body = await call(http, "POST", "/apps", {"name": "broken", "source": "def serve(:"})
    assert status == 400 and "syntax error" in body["message"]
    assert (await call(http, "POST", "/apps", {"name": "pipeline", "source": PIPELINE_APP}))[0] == 409
    assert (await call(http, "POST", "/tasks/nope-123/scale", {"num_executors": 2}))[0] == 404

    # A second app sharing MakeMatrix and Reduce deploys only what is new.
    before = await tasks_by_key(http)
    status, app2 = await call(http, "POST", "/apps", {"name": "sums", "source": SUM_APP})
    assert status == 201, app2
    after = await tasks_by_key(http)
    assert len(after) == 3 and set(after) == set(before)
    shared = {t["key"] for t in app2["tasks"]}
    assert all(sorted(after[k]["users"]) == ["app:pipeline", "app:sums"] for k in shared)
    status, body = await call(http, "POST", "/apps/sums/invoke", {"seed": 5})
    assert status == 200 and body["sum"] == pytest.approx(
        float(make_matrix_tensor(5, 3, 3).sum()), rel=1e-4, abs=1e-4
    )

    # Unregistering one keeps the shared tasks; unregistering both tears everything down.
    status, body = await call(http, "DELETE", "/apps/pipeline")
    assert status == 200 and len(body["torn_down"]) == 1
    assert set(await tasks_by_key(http)) == shared
    executor_pids = [
        e["pid"] for t in (await tasks_by_key(http)).values() for e in t["executors"] if e.get("pid")
    ]
    status, body = await call(http, "DELETE", "/apps/sums")
    assert status == 200 and set(body["torn_down"]) == shared
    status, body = await call(http, "GET", "/tasks")
    assert body["tasks"] == [] and all(d.get("task_key") is None for d in body["devices"])
    for pid in executor_pids:
        for _ in range(50):
            if not pid_alive(pid):
                break
            await asyncio.sleep(0.1)
        assert not pid_alive(pid)


@pytest.mark.slow
async def test_survives_a_dispatcher_and_an_executor_being_killed(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    await ensure_tasklib(http)
    status, app = await call(http, "POST", "/apps", {"name": "pipeline2", "source": PIPELINE_APP})
    assert status == 201, app
    assert cluster.nats_url is not None

    # The victim acknowledges every graph at once (`--ack-delay 0`): by default a graph that
    # replies within the delay sends no keepalive, and on a fast machine all of these might.
    victim = next(c for c in cluster.children if c.name == "dispatcher-0")
    victim.env[ACK_DELAY_ENV] = "0"
    await asyncio.to_thread(cluster.restart, "dispatcher-0")
    # Watch the replicas' keepalives, so the kill lands while dispatcher-0 runs graphs.
    nc = await admin_nats(cluster)
    await wait_for(
        lambda: replica_serving(nc, "dispatcher-0"), DEADLINE, "dispatcher-0 to serve again", interval=0.2
    )
    taken_by_victim = asyncio.Event()

    async def on_keepalive(msg: Any) -> None:
        if not msg.subject.endswith(".alive"):
            return
        if InvokeKeepalive.model_validate_json(msg.data).replica_id == "dispatcher-0":
            taken_by_victim.set()

    # The gateway's graph inboxes: `_INBOX_gateway.<its inbox>.<attempt>.*` (cornserve.gateway.inbox_mux).
    await nc.subscribe("_INBOX_gateway.>", cb=on_keepalive)
    try:
        seeds = list(range(30))
        load = [
            asyncio.ensure_future(call(http, "POST", "/apps/pipeline2/invoke", {"seed": s, "n": 32}))
            for s in seeds
        ]
        async with asyncio.timeout(DEADLINE):
            await taken_by_victim.wait()
        assert victim.proc is not None
        os.killpg(victim.proc.pid, signal.SIGKILL)

        # Graphs in flight on the killed replica are retried on the other one (they had relayed
        # nothing): every request succeeds, none waits for the graph deadline.
        async with asyncio.timeout(DEADLINE):
            results = await asyncio.gather(*load)
        for seed, (status, body) in zip(seeds, results, strict=True):
            assert status == 200, body
            assert body["sum"] == pytest.approx(expected_sum(seed, 32), rel=1e-4, abs=1e-2)
        gateway_log = (cluster.state_dir / "logs" / "gateway.log").read_text()
        assert "retrying a graph on another dispatcher replica" in gateway_log  # the kill hit a graph
        # Requests after the kill all go to the survivor.
        async with asyncio.timeout(DEADLINE):
            after = await asyncio.gather(
                *(call(http, "POST", "/apps/pipeline2/invoke", {"seed": s}) for s in range(10))
            )
        for seed, (status, body) in enumerate(after):
            assert status == 200 and body["sum"] == pytest.approx(expected_sum(seed, 8), rel=1e-4, abs=1e-3)
    finally:
        await nc.close()
        victim.env.pop(ACK_DELAY_ENV, None)
        await asyncio.to_thread(cluster.restart, "dispatcher-0")  # the next tests get two replicas again

    tasks = await tasks_by_key(http)
    matmul = next(t for t in tasks.values() if t["task"] == "MatMul")
    pid = matmul["executors"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(DEADLINE):  # its task manager restarts it
        while True:
            await asyncio.sleep(0.2)
            executor = (await tasks_by_key(http))[matmul["key"]]["executors"][0]
            if executor["state"] == "ready" and executor["pid"] not in (None, pid):
                break
    assert executor["restarts"] >= 1
    for seed in range(3):
        status, body = await call(http, "POST", "/apps/pipeline2/invoke", {"seed": seed})
        assert status == 200 and body["sum"] == pytest.approx(expected_sum(seed, 8), rel=1e-4, abs=1e-3)
    assert (await call(http, "DELETE", "/apps/pipeline2"))[0] == 200
    await wait_dispatchers_registered(http, dispatchers=2)


async def replica_serving(nc: Client, replica_id: str) -> bool:
    """Whether dispatcher replica `replica_id` answers the micro discovery ping."""
    found = await ping_services(nc)
    return any(
        reply.get("metadata", {}).get("replica_id") == replica_id for reply in found[DISPATCHER_SERVICE_NAME]
    )


async def wait_dispatchers_registered(http: aiohttp.ClientSession, dispatchers: int) -> None:
    """Until the gateway's /health is ok with `dispatchers` replicas registered."""

    async def registered() -> bool:
        status, body = await call(http, "GET", "/health")
        return status == 200 and body["services"].get("cornserve-dispatcher", 0) == dispatchers

    await wait_for(registered, DEADLINE, f"/health to list {dispatchers} dispatchers", interval=0.2)


@pytest.mark.slow
def test_cli_against_the_cluster(cluster: LocalCluster) -> None:
    # No token in the environment: the CLI finds the admin token `up` wrote to the state dir.
    env = {**os.environ, "CORNSERVE_URL": cluster.url, "CORNSERVE_STATE_DIR": str(cluster.state_dir)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cornserve.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    out = cli("status")
    assert out.returncode == 0 and ": ok" in out.stdout, out.stderr
    assert cli("tasklib", "add", str(TASKLIB), "--name", "tensor-math").returncode == 0
    assert "tensor-math" in cli("tasklib", "list").stdout
    app_file = cluster.state_dir / "sums_app.py"
    app_file.write_text(SUM_APP)
    out = cli("register", str(app_file), "--name", "cli-sums")
    assert out.returncode == 0 and "ready" in out.stdout and "starting_executors" in out.stdout, out.stderr
    assert "cli-sums" in cli("apps").stdout
    out = cli("invoke", "cli-sums", '{"seed": 2}')
    assert out.returncode == 0 and '"sum"' in out.stdout, out.stderr
    out = cli("invoke", "cli-sums", '{"seed": "x"}')
    assert out.returncode == 1 and "422" in out.stderr
    out = cli("tasks")
    assert "makematrix-" in out.stdout
    key = next(line.split()[0] for line in out.stdout.splitlines() if line.startswith("makematrix-"))
    out = cli("scale", key, "2")
    assert out.returncode == 0 and "2 executor(s)" in out.stdout, out.stderr
    assert cli("unregister", "cli-sums").returncode == 0


def test_sidecars_share_the_clusters_peer_secret(cluster: LocalCluster) -> None:
    """`up` writes one owner-only peer secret and every sidecar serves cross-node TCP with it."""
    import stat

    from cornserve.cli.launcher import SIDECAR_SECRET_FILE
    from cornserve.runtime.secrets import read_secret_file

    secret = cluster.state_dir / SIDECAR_SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(read_secret_file(secret)) >= 32
    sidecars = [c for c in cluster.children if c.name.startswith("sidecar-")]
    assert sidecars
    for child in sidecars:
        assert str(secret) in child.argv
        log = child.log_path.read_text()
        assert "no peer secret configured" not in log and " ready" in log, log
