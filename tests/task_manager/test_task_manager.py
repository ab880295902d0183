"""Task manager against a real nats-server, as a real process, with real executor processes."""

from __future__ import annotations

import asyncio
import json
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
from tests.support.processes import ServiceProcess, python_module
from tests.support.tasklibs import ECHO, echo_task, upload_library
from tests.support.waiting import wait_answering, wait_for, wait_gone

from cornserve.bus.control import (
    AckReply,
    AssignRequest,
    DeviceInfo,
    ExecutorAssignment,
    ExecutorTable,
    ExecutorUsage,
    RouteReply,
    ShutdownRequest,
    TaskManagerStatus,
    tm_subject,
)
from cornserve.bus.micro import ServiceErrorReply, request
from cornserve.bus.schemas import ErrorReply
from cornserve.bus.tm_client import TaskManagerClient
from cornserve.runtime.process import pid_alive
from cornserve.task import serialize_task


def device(i: int) -> DeviceInfo:
    return DeviceInfo(kind="cpu", index=i, sidecar_rank=i)


def assignment(*ids_and_devices: tuple[str, int]) -> dict[str, list[DeviceInfo]]:
    return {e: [device(d)] for e, d in ids_and_devices}


class TM:
    """One task-manager process for one task, driven through the bus's typed client."""

    def __init__(self, nc: Client, key: str, service: ServiceProcess) -> None:
        self.nc, self.key, self.service = nc, key, service
        self.client = TaskManagerClient(nc, key)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.service.proc

    async def call(self, verb: Any, msg: Any, reply: Any, timeout: float = 10.0) -> Any:
        """A raw request, for messages the typed client cannot express."""
        return await request(self.nc, tm_subject(self.key, verb), msg, reply, timeout)

    async def status(self) -> TaskManagerStatus:
        return await self.client.status(10.0)

    async def assign(self, executors: dict[str, list[DeviceInfo]]) -> TaskManagerStatus:
        return await self.client.assign(executors, 60.0)

    async def route(self) -> RouteReply:
        return await self.client.route(10.0)

    async def done(self, executor_id: str) -> None:
        await self.client.done(executor_id)
        await self.nc.flush()

    def log_text(self) -> str:
        return self.service.log()


StartTM = Callable[..., Awaitable[TM]]


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    await upload_library(nats_url, ECHO)
    yield client
    await client.close()


@pytest.fixture
async def start_tm(nats_url: str, nc: Client, tmp_path: Path) -> AsyncIterator[StartTM]:
    started: list[TM] = []

    async def start(label: str, **task_kwargs: Any) -> TM:
        task = echo_task(label, **task_kwargs)
        key = task.deployment_key
        service = ServiceProcess.start(
            f"tm-{label}",
            python_module(
                "cornserve.task_manager.main",
                "--task-key", key,
                "--task-json", json.dumps(serialize_task(task)),
                "--nats-url", nats_url,
                "--log-dir", str(tmp_path),
                "--health-interval", "0.2",
                "--stop-grace", "3",
            ),
            tmp_path,
        )  # fmt: skip
        tm = TM(nc, key, service)
        started.append(tm)

        await wait_answering(tm.status, 30, "the task manager to answer", process=service)
        return tm

    yield start
    for tm in started:
        code = tm.service.stop()
        assert code == 0, f"task manager exited with {code}:\n{tm.log_text()}"
        assert "Traceback" not in tm.log_text(), tm.log_text()


async def executor_pids(tm: TM) -> dict[str, int]:
    status = await tm.status()
    return {e.executor_id: e.pid for e in status.executors if e.pid is not None}


async def post_echo(url: str, text: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + "/echo", json={"text": text}) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def test_assign_launches_executors_and_routes_least_loaded(start_tm: StartTM, nats_url: str) -> None:
    tm = await start_tm("routing")
    status = await tm.assign(assignment(("e0", 0), ("e1", 1)))
    assert status.ready and status.task_key == tm.key
    assert {e.executor_id: (e.state, e.sidecar_ranks) for e in status.executors} == {
        "e0": ("ready", [0]),
        "e1": ("ready", [1]),
    }
    # The launch context reached the executor: sidecar ranks, NATS URL, the descriptor's env.
    async with aiohttp.ClientSession() as s:
        for e in status.executors:
            async with s.get(e.url + "/info") as resp:
                info = await resp.json()
            assert info["executor_id"] == e.executor_id
            assert info["ranks"] == str(e.sidecar_ranks[0])
            assert info["nats_url"] == nats_url
            assert info["label"] == "routing"
            assert info["pid"] == e.pid

    # Nothing completes: routes alternate between the two (fewest in flight).
    picks = [(await tm.route()).executor_id for _ in range(4)]
    assert sorted(picks) == ["e0", "e0", "e1", "e1"]
    assert picks[0] != picks[1]
    # e0 finishes both of its invocations: it is now the least loaded, twice in a row.
    await tm.done("e0")
    await tm.done("e0")
    await wait_for(lambda: _in_flight(tm, "e0", 0), 10, "e0's done messages to be counted")
    first, second = await tm.route(), await tm.route()
    assert (first.executor_id, second.executor_id) == ("e0", "e0")
    assert (await post_echo(first.url, "hi"))["executor_id"] == "e0"
    # Extra done messages never push a count below zero.
    for _ in range(5):
        await tm.done("e1")
    await wait_for(lambda: _in_flight(tm, "e1", 0), 10, "e1 to drop to zero")


async def _in_flight(tm: TM, executor_id: str, expected: int) -> bool:
    status = await tm.status()
    return any(e.executor_id == executor_id and e.in_flight == expected for e in status.executors)


async def test_killed_executor_is_restarted(start_tm: StartTM) -> None:
    tm = await start_tm("restart")
    await tm.assign(assignment(("e0", 0)))
    old_pid = (await executor_pids(tm))["e0"]
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> TaskManagerStatus | None:
        status = await tm.status()
        e = status.executors[0]
        return status if e.state == "ready" and e.restarts == 1 and e.pid not in (None, old_pid) else None

    status = await wait_for(restarted, 60, "the executor to be restarted")
    assert status.executors[0].sidecar_ranks == [0]
    route = await tm.route()
    assert (await post_echo(route.url, "again"))["executor_id"] == "e0"
    assert "process exited with code -9" in tm.log_text()


async def test_scale_down_drains_before_stopping(start_tm: StartTM) -> None:
    tm = await start_tm("drain")
    await tm.assign(assignment(("e0", 0), ("e1", 1)))
    pids = await executor_pids(tm)
    routed = {(await tm.route()).executor_id for _ in range(2)}
    assert routed == {"e0", "e1"}
    await tm.done("e0")  # e1 keeps one invocation in flight

    shrink = asyncio.create_task(tm.assign(assignment(("e0", 0))))

    async def draining() -> bool:
        status = await tm.status()
        return any(e.executor_id == "e1" and e.state == "draining" for e in status.executors)

    await wait_for(draining, 20, "e1 to start draining")
    # Draining: no new routes, the process still serves its in-flight work.
    for _ in range(3):
        assert (await tm.route()).executor_id == "e0"
    assert pid_alive(pids["e1"]) and not shrink.done()
    await tm.done("e1")
    status = await asyncio.wait_for(shrink, 30)
    assert [e.executor_id for e in status.executors] == ["e0"]
    await wait_gone([pids["e1"]])
    assert pid_alive(pids["e0"])


async def test_failed_executor_start_is_reported(start_tm: StartTM) -> None:
    tm = await start_tm("broken", crash=True)
    with pytest.raises(ServiceErrorReply) as info:
        await tm.assign(assignment(("e0", 0)))
    assert info.value.code == "502" and info.value.error.error == "executor_failed"
    assert "exited with code 3" in info.value.error.message
    assert "refusing to start (crash requested)" in info.value.error.message  # the log's tail
    with pytest.raises(ServiceErrorReply) as info:
        await tm.route()
    assert info.value.code == "503" and info.value.error.error == "no_healthy_executor"
    assert "e0: failed" in info.value.error.message


async def test_malformed_messages_get_error_replies(start_tm: StartTM, nc: Client) -> None:
    tm = await start_tm("malformed")
    with pytest.raises(ServiceErrorReply) as info:
        await tm.route()
    assert info.value.code == "503" and "no executors assigned" in info.value.error.message
    for verb in ("route", "status", "assign", "shutdown", "done"):
        for payload in (b"not json", b'{"executors": [], "unexpected": 1}', b"[]"):
            msg = await nc.request(tm_subject(tm.key, verb), payload, timeout=10)
            assert msg.headers is not None and msg.headers.get(ERROR_CODE_HEADER) == "400", (verb, payload)
            ErrorReply.model_validate_json(msg.data)
    # Duplicate executor ids are refused too.
    with pytest.raises(ServiceErrorReply) as info:
        duplicate = [ExecutorAssignment(executor_id="e0", devices=[device(d)]) for d in (0, 1)]
        await tm.call("assign", AssignRequest(executors=duplicate, timeout_s=60), TaskManagerStatus)
    assert info.value.code == "400"
    # A done for an unknown executor, and garbage published without a reply subject, are ignored.
    await tm.done("nobody")
    await nc.publish(tm_subject(tm.key, "done"), b"\xff\xfe")
    status = await tm.status()
    assert status.executors == [] and not status.ready
    assert tm.proc.poll() is None


async def test_shutdown_stops_executors_and_exits(start_tm: StartTM) -> None:
    tm = await start_tm("shutdown")
    await tm.assign(assignment(("e0", 0), ("e1", 1)))
    pids = list((await executor_pids(tm)).values())
    assert len(pids) == 2
    reply = await tm.call("shutdown", ShutdownRequest(request_id="bye"), AckReply, 30.0)
    assert reply.request_id == "bye"
    await wait_for(lambda: tm.proc.poll() is not None, 30, "the task manager to exit")
    assert tm.proc.returncode == 0
    await wait_gone(pids)


@pytest.mark.slow  # test_shutdown_stops_executors_and_exits covers the same stop in the default suite
async def test_sigterm_stops_executors(start_tm: StartTM) -> None:
    tm = await start_tm("sigterm")
    await tm.assign(assignment(("e0", 0)))
    pids = list((await executor_pids(tm)).values())
    assert tm.service.stop() == 0
    await wait_gone(pids)


async def test_table_is_published_and_usage_holds_a_drain(start_tm: StartTM, nc: Client) -> None:
    """Dispatchers route from the published table; what they report outstanding holds a drain."""
    tm = await start_tm("table")
    tables: list[ExecutorTable] = []

    async def on_table(msg: Msg) -> None:
        tables.append(ExecutorTable.model_validate_json(msg.data))

    sub = await nc.subscribe(tm_subject(tm.key, "table"), cb=on_table)
    await tm.assign(assignment(("e0", 0), ("e1", 1)))
    status = await tm.status()
    urls = {e.executor_id: e.url for e in status.executors}

    async def table_of(ids: list[str], after: int = -1) -> ExecutorTable | None:
        """The latest table listing exactly `ids`, of a version above `after`."""
        found = [t for t in tables if [e.executor_id for e in t.executors] == ids and t.version > after]
        return found[-1] if found else None

    both = await wait_for(lambda: table_of(["e0", "e1"]), 20, "a table with both executors")
    assert {e.executor_id: (e.url, e.sidecar_ranks) for e in both.executors} == {
        "e0": (urls["e0"], [0]),
        "e1": (urls["e1"], [1]),
    }
    pids = await executor_pids(tm)

    async def report(version: int, outstanding: dict[str, int]) -> None:
        usage = ExecutorUsage(
            replica_id="d1", instance=both.instance, version=version, outstanding=outstanding, interval_s=60
        )
        await nc.publish(tm_subject(tm.key, "usage"), usage.model_dump_json().encode())
        await nc.flush()

    # A replica routed one invocation to e1 from the table: it counts in e1's in-flight number.
    await report(both.version, {"e1": 1})
    await wait_for(lambda: _in_flight(tm, "e1", 1), 10, "the reported invocation to count")

    shrink = asyncio.create_task(tm.assign(assignment(("e0", 0))))
    only_e0 = await wait_for(lambda: table_of(["e0"], both.version), 20, "a table without the draining e1")
    assert only_e0.version > both.version and only_e0.instance == both.instance
    # The replica acknowledged the new table but e1's invocation is still running: still draining.
    await report(only_e0.version, {"e1": 1})
    await wait_for(lambda: _in_flight(tm, "e1", 1), 10, "the acknowledgement to be in")
    assert pid_alive(pids["e1"]) and not shrink.done()
    # It finished: the drain ends and e1 stops.
    await report(only_e0.version, {})
    status = await asyncio.wait_for(shrink, 30)
    assert [e.executor_id for e in status.executors] == ["e0"]
    await wait_gone([pids["e1"]])
    assert pid_alive(pids["e0"])
    await sub.unsubscribe()
