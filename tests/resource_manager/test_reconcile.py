"""Reconciliation on real processes: a dead task manager is re-created, missing executors are restored
and orphan task managers are reaped, each without anybody deploying anything.

The resource managers here reconcile every `RECONCILE_INTERVAL_S` (1 s); detection is checked
against that interval plus a margin for a loaded machine, the repair itself (a new task manager and
executor process start) against a generous deadline.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client
from tests.resource_manager.conftest import RECONCILE_INTERVAL_S
from tests.resource_manager.support import (
    StartRM,
    clear_deployments,
    collect,
    executor_pids,
    outcome,
    tm_pids,
)
from tests.support.tasklibs import echo_task
from tests.support.waiting import wait_for, wait_gone

from cornserve.bus.control import KV_DEPLOYMENTS, RM_EVENTS, DeploymentEvent, DeploymentInfo, DeploymentRecord
from cornserve.bus.kv import kv_get, open_bucket
from cornserve.bus.tm_client import TaskManagerClient

# Each test kills and waits out a reconciliation pass or two (10-20 s): run with -m slow (.ci/run).
pytestmark = pytest.mark.slow

DETECT_MARGIN_S = 10.0
"""Beyond one interval, for the pass to run and its event to arrive on a loaded 2-core machine."""
REPAIR_DEADLINE_S = 90.0
"""A new task manager and executor process start (each imports the task libraries)."""


def parsed(messages: list[Any]) -> list[DeploymentEvent]:
    return [DeploymentEvent.model_validate_json(m.data) for m in messages]


async def echo_through(nc: Client, key: str, text: str) -> None:
    """Route through the task manager of `key` and call its executor."""
    route = await TaskManagerClient(nc, key).route(10)
    async with aiohttp.ClientSession() as s, s.post(route.url + "/echo", json={"text": text}) as resp:
        assert (await resp.json())["text"] == text
    await TaskManagerClient(nc, key).done(route.executor_id)


async def test_a_killed_task_manager_is_recreated_without_a_deploy(start_rm: StartRM, nc: Client) -> None:
    rm = await start_rm()
    task = echo_task("dies")
    key = task.deployment_key
    (dep,) = (await rm.deploy("app", task)).deployments
    (tm_pid,) = tm_pids(key)
    events, sub = await collect(nc, RM_EVENTS)

    os.kill(tm_pid, signal.SIGKILL)  # the task manager only: its executor gets SIGTERM from the kernel
    await wait_for(
        lambda: any(e.kind == "updated" and e.deployment.state == "deploying" for e in parsed(events)),
        RECONCILE_INTERVAL_S + DETECT_MARGIN_S,
        "the deployment to be announced as being re-created",
    )

    async def serving_again() -> DeploymentInfo | None:
        (info,) = (await rm.state()).deployments
        pids = tm_pids(key)
        return info if info.state == "ready" and pids and pids != [tm_pid] else None

    again = await wait_for(serving_again, REPAIR_DEADLINE_S, "the task manager to be re-created")
    assert again.users == ["app"] and [e.executor_id for e in again.executors] == ["e0"]
    assert again.devices == dep.devices  # the same devices, never freed in between
    await wait_gone([tm_pid, *executor_pids(dep)])
    await echo_through(nc, key, "back")
    record = await kv_get(await open_bucket(nc, KV_DEPLOYMENTS), key, DeploymentRecord)
    assert record is not None and record.tm_pid == tm_pids(key)[0]
    kinds = [(e.kind, e.deployment.state) for e in parsed(events) if e.deployment.task_key == key]
    assert kinds[-1] == ("ready", "ready"), kinds
    log = rm.log_text()
    assert log.count("re-creating its task manager") == 1, log  # one action, logged once with its reason
    print(next(line for line in log.splitlines() if "task manager re-created" in line))  # measured (-s)
    assert f"exited with code -{int(signal.SIGKILL)}" in log, log
    await sub.unsubscribe()
    assert outcome(await rm.release("app")) == ([key], [key])


async def test_an_executor_missing_from_its_task_manager_is_started_again(
    start_rm: StartRM, nc: Client
) -> None:
    rm = await start_rm()
    task = echo_task("missing")
    key = task.deployment_key
    await rm.deploy("app", task)
    scaled = await rm.scale(key, 2)
    e0 = next(e for e in scaled.executors if e.executor_id == "e0")
    e1 = next(e for e in scaled.executors if e.executor_id == "e1")

    # Behind the resource manager's back the task manager drops e1 (as after an RM crash mid-scale).
    tm = TaskManagerClient(nc, key)
    await tm.assign({"e0": e0.devices}, 60)
    assert e1.pid is not None
    await wait_gone([e1.pid])

    async def restored() -> bool:
        status = await tm.status(5)
        states = {e.executor_id: e.state for e in status.executors}
        return states == {"e0": "ready", "e1": "ready"}

    await wait_for(restored, REPAIR_DEADLINE_S, "e1 to be started again")
    assert "does not run executor(s) e1; assigning its executors again" in rm.log_text()
    (info,) = (await rm.state()).deployments
    assert info.state == "ready" and sorted(e.executor_id for e in info.executors) == ["e0", "e1"]
    assert outcome(await rm.release("app")) == ([key], [key])


async def test_an_orphan_task_manager_is_reaped(start_rm: StartRM, nc: Client) -> None:
    rm = await start_rm()
    task = echo_task("orphan")
    key = task.deployment_key
    (dep,) = (await rm.deploy("app", task)).deployments
    (tm_pid,) = tm_pids(key)

    # The RM crashes and the deployment is forgotten meanwhile (its record deleted by hand).
    rm.proc.send_signal(signal.SIGKILL)
    rm.proc.wait(timeout=30)
    await clear_deployments(nc)
    rm = await start_rm()
    await wait_gone([tm_pid, *executor_pids(dep)], timeout=RECONCILE_INTERVAL_S + DETECT_MARGIN_S + 20)
    assert f"reaping orphan task manager of {key} (pid {tm_pid}): no deployment wants it" in rm.log_text()
    assert (await rm.state()).deployments == []
