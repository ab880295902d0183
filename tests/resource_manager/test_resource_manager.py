"""Resource manager as a real process, spawning real task managers and executors, over a real nats-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER
from tests.support.processes import ServiceProcess, pids_matching, python_module
from tests.support.tasklibs import ECHO, echo_task, upload_library
from tests.support.waiting import wait_answering, wait_for, wait_gone

from cornserve.bus.control import (
    KV_DEPLOYMENTS,
    RM_DEPLOY,
    RM_EVENTS,
    RM_RELEASE,
    RM_SCALE,
    RM_STATE,
    ClusterState,
    DeploymentEvent,
    DeploymentInfo,
    DeploymentRecord,
    DeploymentReleaseReply,
    DeployReply,
    DeployRequest,
    ProgressEvent,
)
from cornserve.bus.kv import kv_all, kv_get, open_bucket
from cornserve.bus.micro import ServiceErrorReply, request
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.bus.schemas import ErrorReply
from cornserve.bus.tm_client import TaskManagerClient
from cornserve.runtime.process import pid_alive
from cornserve.task import serialize_task

CPU_SLOTS = 3


class RM:
    """One resource-manager process, driven through the bus's typed client."""

    def __init__(self, nc: Client, service: ServiceProcess) -> None:
        self.nc, self.service = nc, service
        self.client = ResourceManagerClient(nc, deploy_timeout_s=90, margin_s=30, release_timeout_s=60)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.service.proc

    async def deploy(
        self, owner: str, *tasks: Any, on_progress: Callable[[ProgressEvent], None] | None = None
    ) -> DeployReply:
        return await self.client.deploy(owner, [serialize_task(t) for t in tasks], on_progress)

    async def release(self, owner: str) -> DeploymentReleaseReply:
        return await self.client.release(owner)

    async def state(self) -> ClusterState:
        return await self.client.state(20)

    async def scale(self, key: str, n: int) -> DeploymentInfo:
        return await self.client.scale(key, n)

    def log_text(self) -> str:
        return self.service.log()


StartRM = Callable[[], Awaitable[RM]]


async def clear_deployments(nc: Client) -> None:
    kv = await open_bucket(nc, KV_DEPLOYMENTS)
    for rec in await kv_all(kv, DeploymentRecord):
        await kv.purge(rec.task_key)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    await upload_library(nats_url, ECHO)
    await clear_deployments(client)
    yield client
    await clear_deployments(client)
    await client.close()


@pytest.fixture
async def start_rm(nats_url: str, nc: Client, tmp_path: Path) -> AsyncIterator[StartRM]:
    started: list[RM] = []

    async def start() -> RM:
        service = ServiceProcess.start(
            f"rm-{len(started)}",
            python_module(
                "cornserve.resource_manager.main",
                "--nats-url", nats_url,
                "--cpu-slots", str(CPU_SLOTS),
                "--device-kind", "cpu",
                "--log-dir", str(tmp_path / "logs"),
            ),
            tmp_path,
        )  # fmt: skip
        rm = RM(nc, service)
        started.append(rm)

        await wait_answering(
            lambda: rm.client.state(2), 60, "the resource manager to answer", process=service
        )
        return rm

    yield start
    for rm in started:
        if rm.proc.poll() is None:
            assert rm.service.stop(timeout=60) == 0, rm.log_text()
        assert "Traceback" not in rm.log_text(), rm.log_text()
    # A clean shutdown leaves no task manager behind.
    await wait_gone(pids_matching("cornserve.task_manager.main", str(tmp_path / "logs")))


def tm_pids(key: str) -> list[int]:
    return pids_matching("cornserve.task_manager.main", "--task-key", key)


async def collect(nc: Client, subject: str) -> tuple[list[Msg], Any]:
    got: list[Msg] = []

    async def cb(msg: Msg) -> None:
        got.append(msg)

    sub = await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return got, sub


def executor_pids(info: DeploymentInfo) -> list[int]:
    return [e.pid for e in info.executors if e.pid is not None]


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


def outcome(reply: DeploymentReleaseReply) -> tuple[list[str], list[str]]:
    return reply.released, reply.torn_down


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


async def test_restart_adopts_running_task_managers_and_respawns_stopped_ones(
    start_rm: StartRM, nc: Client
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

    # Clean shutdown stops every task manager (adopted ones too); the record stays for a re-spawn.
    assert rm.service.stop(timeout=60) == 0
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


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORNSERVE_NATS_URL", raising=False)


async def test_dead_task_manager_is_reported_and_redeployed(start_rm: StartRM) -> None:
    rm = await start_rm()
    task = echo_task("dies")
    key = task.deployment_key
    (dep,) = (await rm.deploy("app", task)).deployments
    (tm_pid,) = tm_pids(key)
    os.killpg(tm_pid, signal.SIGKILL)  # the task manager and its executors
    await wait_gone([tm_pid, *executor_pids(dep)])
    state = await rm.state()
    (failed,) = state.deployments
    assert failed.state == "failed" and "task manager not answering" in failed.message
    # The next deploy of the key starts it over, keeping its users.
    (again,) = (await rm.deploy("app2", task)).deployments
    assert again.state == "ready" and sorted(again.users) == ["app", "app2"]
    assert len(tm_pids(key)) == 1 and tm_pids(key) != [tm_pid]
    assert outcome(await rm.release("app")) == ([key], [])
    assert outcome(await rm.release("app2")) == ([key], [key])
