"""Resource manager as a real process, spawning real task managers and executors, over a real nats-server."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER
from tests.resource_manager.support import CPU_SLOTS, StartRM, collect, executor_pids, outcome, tm_pids
from tests.support.tasklibs import ECHO, echo_task
from tests.support.waiting import wait_for, wait_gone

from cornserve.bus.control import (
    KV_DEPLOYMENTS,
    RM_DEPLOY,
    RM_EVENTS,
    RM_RELEASE,
    RM_SCALE,
    RM_STATE,
    DeploymentEvent,
    DeploymentInfo,
    DeploymentRecord,
    DeployReply,
    DeployRequest,
    ProgressEvent,
)
from cornserve.bus.kv import kv_get, open_bucket
from cornserve.bus.micro import ServiceErrorReply, request
from cornserve.bus.schemas import ErrorReply
from cornserve.bus.tm_client import TaskManagerClient
from cornserve.runtime.detached import DetachedGroups
from cornserve.runtime.process import pid_alive


@pytest.mark.slow
async def test_shared_task_deploys_once_and_is_torn_down_with_its_last_user(
    start_rm: StartRM, nc: Client
) -> None:
    rm = await start_rm()
    task = echo_task("shared")
    key = task.deployment_key
    events, events_sub = await collect(nc, RM_EVENTS)
    progress: list[ProgressEvent] = []

    reply = await rm.deploy("app1", task, on_progress=progress.append)
    (dep,) = reply.deployments
    assert dep.task_key == key and dep.state == "ready" and dep.users == ["app1"]
    assert len(dep.executors) == 1 and dep.executors[0].state == "ready"
    assert [d.sidecar_rank for d in dep.devices] == dep.executors[0].sidecar_ranks
    stages = [event.stage for event in progress]
    assert stages == ["queued", "allocating", "starting_task_manager", "starting_executors", "ready"]
    await wait_for(lambda: events, 10, "a deployment event")
    first = DeploymentEvent.model_validate_json(events[0].data)
    assert first.kind == "ready" and first.deployment.task_key == key

    # Two more owners at once, plus app1 again (idempotent): still one task manager.
    replies = await asyncio.gather(rm.deploy("app2", task), rm.deploy("app3", task), rm.deploy("app1", task))
    assert {r.deployments[0].task_key for r in replies} == {key}
    assert len(tm_pids(key)) == 1
    state = await rm.state()
    (dep,) = state.deployments
    assert sorted(dep.users) == ["app1", "app2", "app3"] and dep.state == "ready"
    used = [d for d in state.devices if d.task_key is not None]
    assert [d.task_key for d in used] == [key]
    record = await kv_get(await open_bucket(nc, KV_DEPLOYMENTS), key, DeploymentRecord)
    assert record is not None and sorted(record.users) == ["app1", "app2", "app3"]
    assert record.tm_pid == tm_pids(key)[0]

    # The deployment routes: its task manager answers on the key's subject.
    route = await TaskManagerClient(nc, key).route(10)
    async with aiohttp.ClientSession() as s, s.post(route.url + "/echo", json={"text": "x"}) as resp:
        assert (await resp.json())["text"] == "x"

    assert outcome(await rm.release("app1")) == ([key], [])
    assert outcome(await rm.release("app1")) == ([], [])
    assert outcome(await rm.release("app2")) == ([key], [])
    assert len(tm_pids(key)) == 1
    processes = [*tm_pids(key), *executor_pids(dep)]
    assert len(processes) == 2

    assert outcome(await rm.release("app3")) == ([key], [key])
    await wait_gone(processes)
    state = await rm.state()
    assert state.deployments == [] and all(d.task_key is None for d in state.devices)
    assert await kv_get(await open_bucket(nc, KV_DEPLOYMENTS), key, DeploymentRecord) is None
    await wait_for(
        lambda: any(DeploymentEvent.model_validate_json(m.data).kind == "removed" for m in events),
        10,
        "the removed event",
    )
    await events_sub.unsubscribe()


@pytest.mark.slow
async def test_deploy_errors_free_everything(start_rm: StartRM) -> None:
    rm = await start_rm()
    big = echo_task("big", devices=CPU_SLOTS + 1)
    with pytest.raises(ServiceErrorReply) as info:
        await rm.deploy("app", big)
    assert info.value.code == "503" and info.value.error.error == "insufficient_devices"
    assert (
        f"needs {CPU_SLOTS + 1} device(s) but only {CPU_SLOTS} of {CPU_SLOTS} are free"
        in info.value.error.message
    )
    assert info.value.error.details == {"needed": CPU_SLOTS + 1, "free": CPU_SLOTS, "total": CPU_SLOTS}

    # An executor that cannot start: the error carries its message; devices and processes are freed.
    ok, broken = echo_task("fine"), echo_task("broken", crash=True)
    with pytest.raises(ServiceErrorReply) as info:
        await rm.deploy("app", ok, broken)
    assert info.value.code == "502" and info.value.error.error == "deploy_failed"
    assert "refusing to start (crash requested)" in info.value.error.message
    state = await rm.state()
    # All or nothing: the owner's other task was released too.
    assert state.deployments == [] and all(d.task_key is None for d in state.devices)
    await wait_gone([*tm_pids(broken.deployment_key), *tm_pids(ok.deployment_key)])


@pytest.mark.slow
async def test_scale_up_and_down(start_rm: StartRM) -> None:
    rm = await start_rm()
    task = echo_task("scale")
    key = task.deployment_key
    await rm.deploy("app", task)
    up = await rm.scale(key, 2)
    assert sorted(e.executor_id for e in up.executors) == ["e0", "e1"]
    assert all(e.state == "ready" for e in up.executors) and len(up.devices) == 2
    with pytest.raises(ServiceErrorReply) as info:
        await rm.scale(key, CPU_SLOTS + 1)
    assert info.value.code == "503" and info.value.error.error == "insufficient_devices"
    state = await rm.state()
    assert len(state.deployments[0].executors) == 2  # the failed scale-up changed nothing
    removed = next(e for e in up.executors if e.executor_id == "e1")
    down = await rm.scale(key, 1)
    assert [e.executor_id for e in down.executors] == ["e0"] and len(down.devices) == 1
    assert removed.pid is not None
    await wait_gone([removed.pid])
    state = await rm.state()
    assert sum(d.task_key == key for d in state.devices) == 1
    with pytest.raises(ServiceErrorReply) as info:
        await rm.scale("nosuchtask-0", 1)
    assert info.value.code == "404"


async def test_malformed_requests_get_error_replies(start_rm: StartRM, nc: Client) -> None:
    rm = await start_rm()
    for subject in (RM_DEPLOY, RM_RELEASE, RM_STATE, RM_SCALE):
        for payload in (b"not json", b'{"owner": ""}', b"[1]", b'{"request_id": "r", "bogus": true}'):
            msg = await nc.request(subject, payload, timeout=10)
            assert msg.headers is not None and msg.headers.get(ERROR_CODE_HEADER) == "400", (subject, payload)
            ErrorReply.model_validate_json(msg.data)
    bad_tasks: list[Any] = [
        {"name": "NoSuchTask", "config": {}},
        {"nonsense": 1},
        {"name": f"{ECHO.name}:EchoTask", "config": {"label": 5}},
    ]
    for spec in bad_tasks:
        req = DeployRequest(owner="app", tasks=[spec])
        with pytest.raises(ServiceErrorReply) as info:
            await request(nc, RM_DEPLOY, req, DeployReply, 30)
        assert info.value.code == "400" and info.value.error.error == "bad_task"
        assert info.value.error.message.startswith("tasks[0]: ")
    state = await rm.state()
    assert state.deployments == [] and len(state.devices) == CPU_SLOTS
    assert rm.proc.poll() is None


@pytest.mark.slow
async def test_restart_adopts_running_task_managers_and_respawns_stopped_ones(
    start_rm: StartRM, nc: Client, tmp_path: Path
) -> None:
    rm = await start_rm()
    task = echo_task("adopt")
    key = task.deployment_key
    (dep,) = (await rm.deploy("app", task)).deployments
    (tm_pid,) = tm_pids(key)

    # Crash: the task manager and its executor survive; the next resource manager adopts them.
    rm.proc.send_signal(signal.SIGKILL)
    rm.proc.wait(timeout=30)
    assert pid_alive(tm_pid) and all(pid_alive(p) for p in executor_pids(dep))
    rm = await start_rm()
    state = await rm.state()
    (adopted,) = state.deployments
    assert adopted.state == "ready" and adopted.users == ["app"]
    assert [e.pid for e in adopted.executors] == [e.pid for e in dep.executors]
    assert tm_pids(key) == [tm_pid]
    assert [d.task_key for d in state.devices if d.task_key] == [key]
    # Sharing after adoption works, and numbering continues.
    assert (await rm.deploy("app2", task)).deployments[0].users == ["app", "app2"]
    up = await rm.scale(key, 2)
    assert sorted(e.executor_id for e in up.executors) == ["e0", "e1"]
    await rm.scale(key, 1)

    # A graceful stop (SIGTERM) leaves the data plane running too: the next RM adopts it unchanged.
    assert rm.service.stop(timeout=60) == 0
    assert tm_pids(key) == [tm_pid] and all(pid_alive(p) for p in executor_pids(dep))
    rm = await start_rm()
    (adopted,) = (await rm.state()).deployments
    assert adopted.state == "ready" and [e.pid for e in adopted.executors] == executor_pids(dep)
    assert "adopted running task manager of" in rm.log_text()

    # The data plane stopped while no RM runs (records stay): the next start re-spawns it.
    assert rm.service.stop(timeout=60) == 0
    DetachedGroups(tmp_path / "logs" / "task-managers").stop_all(grace_s=20)
    await wait_gone([tm_pid, *executor_pids(dep)])
    rm = await start_rm()

    async def respawned() -> DeploymentInfo | None:
        state = await rm.state()
        return state.deployments[0] if state.deployments and state.deployments[0].state == "ready" else None

    again = await wait_for(respawned, 60, "the deployment to be re-spawned")
    assert sorted(again.users) == ["app", "app2"] and len(again.executors) == 1
    (new_tm,) = tm_pids(key)
    assert new_tm != tm_pid
    released = await rm.release("app")
    assert released.torn_down == []
    released = await rm.release("app2")
    assert released.torn_down == [key]
    await wait_gone([new_tm, *executor_pids(again)])
