"""Reconciliation and restart adoption on the shared local cluster, under `up`'s supervisor.

An app is invoked without pause while the resource manager is killed (SIGKILL) and then stopped
(SIGTERM): each time the supervisor starts it again, it adopts the running task managers, their
and their executors' pids do not change, and no invocation fails. Then a task manager is killed:
the resource manager re-creates it within its reconcile interval (plus a margin) and the app
serves again without being deployed again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from tests.control.apps import SUM_APP
from tests.control.support import call, ensure_tasklib, make_matrix_tensor, tasks_by_key
from tests.support.waiting import wait_for

from cornserve.cli.launcher import TASK_MANAGER_DIR, Child, LocalCluster
from cornserve.runtime.detached import DetachedGroups

pytestmark = pytest.mark.faults
"""Two resource-manager restarts and a task-manager re-creation (minutes on a loaded machine): with
the fault matrix, out of the default suite; tests/resource_manager covers adoption there."""

APP = "reconcile-sums"
DEADLINE = 120.0
RECONCILE_INTERVAL_S = 5.0
"""The resource manager's default `--reconcile-interval` (what `up` runs)."""
DETECT_MARGIN_S = 10.0
"""Beyond one interval: the pass itself and a loaded 2-core machine."""


async def invoke(http: aiohttp.ClientSession, seed: int) -> None:
    status, body = await call(http, "POST", f"/apps/{APP}/invoke", {"seed": seed})
    assert status == 200, body
    assert body["sum"] == pytest.approx(float(make_matrix_tensor(seed, 3, 3).sum()), rel=1e-4, abs=1e-4)


def rm_child(cluster: LocalCluster) -> Child:
    return next(c for c in cluster.children if c.name == "resource-manager")


def log_since(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def data_plane(http: aiohttp.ClientSession, cluster: LocalCluster) -> dict[str, object]:
    """Task-manager pids (from the records) and executor pids (from the RM), by task key."""
    tms = {r.name: r.pid for r in DetachedGroups(cluster.state_dir / TASK_MANAGER_DIR).records() if r.alive()}
    tasks = await tasks_by_key(http)
    return {key: (tms.get(key), [e["pid"] for e in t["executors"]]) for key, t in tasks.items()}


async def restarted_and_adopted(cluster: LocalCluster, old_pid: int, log_offset: int, keys: int) -> None:
    """Until the supervisor has started a new resource manager and it adopted `keys` task managers."""
    child = rm_child(cluster)

    def adopted() -> bool:
        if child.proc is None or child.proc.pid == old_pid or not child.alive():
            return False
        return log_since(child.log_path, log_offset).count("adopted running task manager of") >= keys

    await wait_for(
        adopted, DEADLINE, "the restarted resource manager to adopt the task managers", interval=0.2
    )


async def test_rm_restarts_keep_the_data_plane_and_a_killed_task_manager_comes_back(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    await ensure_tasklib(http)
    status, body = await call(http, "POST", "/apps", {"name": APP, "source": SUM_APP})
    assert status == 201, body
    await invoke(http, 1)
    said: list[str] = []
    cluster.say = said.append
    stop = threading.Event()
    result: list[int] = []
    supervisor = threading.Thread(target=lambda: result.append(cluster.supervise(stop.is_set, poll_s=0.2)))
    supervisor.start()
    failures: list[str] = []
    done = asyncio.Event()
    count = 0

    async def keep_invoking() -> None:
        nonlocal count
        while not done.is_set():
            try:
                await invoke(http, count % 7)
            except (AssertionError, aiohttp.ClientError, TimeoutError) as exc:
                failures.append(repr(exc))
            count += 1
            await asyncio.sleep(0.05)

    try:
        before = await data_plane(http, cluster)
        assert len(before) == 2 and all(tm is not None for tm, _ in before.values()), before  # type: ignore[misc]
        invoker = asyncio.ensure_future(keep_invoking())
        for sig in (signal.SIGKILL, signal.SIGTERM):  # a crash, then a graceful restart
            rm = rm_child(cluster)
            assert rm.proc is not None
            old_pid, offset = rm.proc.pid, rm.log_path.stat().st_size
            os.kill(old_pid, sig)
            await restarted_and_adopted(cluster, old_pid, offset, keys=len(before))
            assert await data_plane(http, cluster) == before, sig.name
        done.set()
        await invoker
        assert failures == [], failures[:5]
        assert count > 0

        # A task manager dies: re-created within the interval, and the app serves again undeployed.
        key = next(k for k in before if k.startswith("makematrix-"))
        tm_pid = before[key][0]  # type: ignore[index]
        rm = rm_child(cluster)
        offset = rm.log_path.stat().st_size
        os.kill(tm_pid, signal.SIGKILL)
        killed = time.monotonic()
        await wait_for(
            lambda: f"task {key}: its task manager (pid {tm_pid}) exited" in log_since(rm.log_path, offset),
            RECONCILE_INTERVAL_S + DETECT_MARGIN_S,
            "the resource manager to notice the dead task manager",
            interval=0.1,
        )
        detected = time.monotonic() - killed

        async def serves() -> bool:
            try:
                await invoke(http, 5)
            except (AssertionError, aiohttp.ClientError, TimeoutError):
                return False
            return True

        await wait_for(serves, DEADLINE, "the app to serve again", interval=0.2)
        print(
            f"task manager killed: noticed after {detected:.1f} s, serving after {time.monotonic() - killed:.1f} s"
        )
        after = await data_plane(http, cluster)
        assert after[key][0] not in (None, tm_pid), after  # type: ignore[index]
        assert "re-created" in log_since(rm.log_path, offset)
    finally:
        done.set()
        stop.set()
        await asyncio.to_thread(supervisor.join, 60)
        status, body = await call(http, "DELETE", f"/apps/{APP}")
        assert status in (200, 404), body
    assert result == [0], said
    for child in cluster.children:
        assert child.alive(), f"{child.name} died"
