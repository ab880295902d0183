"""The invocation channel: real executor processes, called with the dispatcher's `ExecutorChannels`.

The executors of this module are launched with a channel port, as task managers launch them. The
channel must answer what ``POST /invoke`` answers (statuses, bodies, and the dispatcher's faults
made from them), carry many calls on one connection, cancel a handler when its caller gives up, fail
in-flight calls when the executor dies, and close a connection that sends a malformed frame.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.executor.support import ExecutorSetup, HttpRunner, LaunchedExecutor, launch_executor
from tests.executor.test_executor import (
    PipelineInput,
    all_idle,
    arenas_empty,
    assert_reduced,
    composites,
    expected,
    wait_until,
)

from cornserve.bus import invoke_channel as wire
from cornserve.bus.control import RouteReply
from cornserve.bus.micro import ServiceFault
from cornserve.dispatcher.channels import ChannelBroken, ChannelRefused, ExecutorChannels
from cornserve.dispatcher.graph import Routed, _status_failure, _status_fault
from cornserve.runtime.tracing import TRACES_DIR_ENV
from cornserve.task import TaskExecutionError, TaskInvocation, TaskOutput, use_graph_runner

CALL_TIMEOUT_S = 60.0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as s:
        yield s


@pytest.fixture
async def channels() -> AsyncIterator[ExecutorChannels]:
    pool = ExecutorChannels(connect_timeout_s=10.0)
    try:
        yield pool
    finally:
        await pool.close()


@dataclass
class ChannelRunner(HttpRunner):
    """`HttpRunner`'s graph steps, each unary call sent over the executor's channel instead."""

    channels: ExecutorChannels = field(default_factory=ExecutorChannels)

    async def run_one(self, position: int, inv: TaskInvocation) -> TaskOutput:
        executor = self.executors[inv.task.deployment_key]
        req = inv.task.descriptor.to_request(inv.task, inv)
        assert not req.stream and req.body is not None
        reply = await self.channels.call(
            executor.channel, req.path, json.dumps(req.body).encode(), {}, CALL_TIMEOUT_S
        )
        self.responses.append(reply.status)
        if reply.status != 200:
            raise TaskExecutionError(
                json.loads(reply.body)["error"], task_name=inv.task.display_name(), position=position
            )
        return inv.task.descriptor.from_response(inv.task, inv, json.loads(reply.body))


def invoke_body(inv: TaskInvocation) -> bytes:
    return json.dumps(inv.model_dump(mode="json")).encode()


def routed(executor: LaunchedExecutor) -> Routed:
    route = RouteReply(
        request_id="", executor_id=executor.executor_id, url=executor.url, sidecar_ranks=executor.ranks
    )
    return Routed(position=0, task_key=executor.task.deployment_key, task_name="T", route=route)


def shape(fault: ServiceFault) -> tuple[int, str, str, dict[str, Any]]:
    return fault.code, fault.error, fault.message, fault.details


async def in_flight(session: aiohttp.ClientSession, executor: LaunchedExecutor) -> int:
    async with session.get(executor.url + "/health") as resp:
        return int((await resp.json())["in_flight"])


async def test_graphs_over_one_connection_per_executor_match_torch(
    cluster: ExecutorSetup, session: aiohttp.ClientSession, channels: ExecutorChannels
) -> None:
    """Eight graphs at once, every call on the channel: right results, one connection per executor."""
    lib = cluster.lib
    pipeline = composites(lib)[0]()
    runner = ChannelRunner(cluster.by_key(), session, channels=channels)
    inputs = [PipelineInput(seed_a=10 + i, seed_b=20 + i) for i in range(8)]
    with use_graph_runner(runner):
        outs = await asyncio.gather(*(pipeline(x) for x in inputs))
    for out, x in zip(outs, inputs, strict=True):
        assert_reduced(out, expected(lib, x))
    assert runner.responses == [200] * (4 * len(inputs))
    assert channels.open_connections() == 3  # MakeMatrix, MatMul, Reduce: one each, shared by 32 calls
    await wait_until(lambda: arenas_empty(cluster), "every forwarded tensor released")


async def test_error_answers_and_their_faults_match_http(
    cluster: ExecutorSetup, session: aiohttp.ClientSession, channels: ExecutorChannels
) -> None:
    """500 (handler failure), 400 (bad invocations): the same status and body as HTTP, the same fault."""
    lib = cluster.lib
    make, reduce = cluster.executors["MakeMatrix"], cluster.executors["Reduce"]
    failing = make.task.trace(lib.MakeMatrixInput(seed=3, rows=2, cols=2, fail=True)).invocations[0]
    reduce_body = composites(lib)[0]().trace(PipelineInput(seed_a=1, seed_b=2)).invocations[3]
    cases: list[tuple[LaunchedExecutor, bytes, int]] = [
        (make, invoke_body(failing), 500),
        (reduce, b"not json", 400),
        (reduce, invoke_body(failing), 400),  # MakeMatrix's invocation sent to Reduce's executor
        (
            reduce,
            json.dumps({**reduce_body.model_dump(mode="json"), "task_input": {"x": "no"}}).encode(),
            400,
        ),
    ]
    for executor, body, status in cases:
        reply = await channels.call(executor.channel, "/invoke", body, {}, CALL_TIMEOUT_S)
        async with session.post(executor.url + "/invoke", data=body) as resp:
            assert (reply.status, resp.status) == (status, status)
            assert json.loads(reply.body) == await resp.json()
        async with session.post(executor.url + "/invoke", data=body) as resp:
            http_fault = await _status_failure(routed(executor), resp)
        channel_fault = _status_fault(routed(executor), reply.status, reply.body, "", reply.retry_after)
        assert shape(channel_fault) == shape(http_fault)
    assert json.loads(reply.body)["error"].startswith("invalid task invocation")
    reply = await channels.call(make.channel, "/info", invoke_body(failing), {}, CALL_TIMEOUT_S)
    assert reply.status == 404
    await wait_until(lambda: all_idle(cluster, session), "executors idle")


async def test_max_in_flight_refusal_and_cancel_reach_the_executor(
    cluster: ExecutorSetup, session: aiohttp.ClientSession, channels: ExecutorChannels
) -> None:
    """`--max-in-flight 1`: the second call is 429 with Retry-After; cancelling the first stops its handler."""
    lib = cluster.lib
    bounded = launch_executor(
        lib.Reduce(),
        "reduce-channel-bounded",
        cluster.executors["Reduce"].ranks,
        cluster.nats_url,
        cluster.log_dir,
        {"CORNSERVE_MAX_IN_FLIGHT": "1"},
    )
    try:
        await asyncio.to_thread(bounded.wait_ready)
        graph = composites(lib)[0]().trace(PipelineInput(seed_a=3, seed_b=4))
        # Reduce's input is MatMul's forward, which never comes: the handler waits on its sidecar.
        waiting_body = invoke_body(graph.invocations[3])
        waiting = asyncio.create_task(
            channels.call(bounded.channel, "/invoke", waiting_body, {}, CALL_TIMEOUT_S)
        )
        await wait_until(
            lambda: _equals(in_flight(session, bounded), 1), "the first invocation to be running"
        )
        refused = await channels.call(bounded.channel, "/invoke", waiting_body, {}, CALL_TIMEOUT_S)
        assert refused.status == 429 and refused.retry_after == "1"
        assert "--max-in-flight" in json.loads(refused.body)["error"]
        async with session.post(bounded.url + "/invoke", data=waiting_body) as resp:
            http_fault = await _status_failure(routed(bounded), resp)
        fault = _status_fault(routed(bounded), refused.status, refused.body, "", refused.retry_after)
        assert shape(fault) == shape(http_fault) and fault.code == 429

        waiting.cancel()  # a cancel frame: the handler is cancelled and its slot freed
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await wait_until(lambda: _equals(in_flight(session, bounded), 0), "the cancelled invocation to leave")
        assert channels.open_connections() == 1  # the connection stays for the next call
        await wait_until(
            lambda: _true("cancelled it on the channel" in bounded.log()), "the executor to log the cancel"
        )
    finally:
        code = bounded.stop()
    assert code == 0, bounded.log()


async def test_a_killed_executor_fails_in_flight_calls_then_refuses(
    cluster: ExecutorSetup, session: aiohttp.ClientSession, channels: ExecutorChannels
) -> None:
    lib = cluster.lib
    doomed = launch_executor(
        lib.Reduce(),
        "reduce-channel-doomed",
        cluster.executors["Reduce"].ranks,
        cluster.nats_url,
        cluster.log_dir,
    )
    try:
        await asyncio.to_thread(doomed.wait_ready)
        graph = composites(lib)[0]().trace(PipelineInput(seed_a=5, seed_b=6))
        body = invoke_body(graph.invocations[3])
        calls = [
            asyncio.create_task(channels.call(doomed.channel, "/invoke", body, {}, CALL_TIMEOUT_S))
            for _ in range(3)
        ]
        await wait_until(lambda: _equals(in_flight(session, doomed), 3), "three calls running")
        os.kill(doomed.proc.pid, signal.SIGKILL)
        for call in calls:
            with pytest.raises(ChannelBroken):
                await call
        # Once the process is gone (its listener closed with it), a new call reaches nothing.
        await asyncio.to_thread(doomed.proc.wait, 30)
        with pytest.raises(ChannelRefused):
            await channels.call(doomed.channel, "/invoke", body, {}, CALL_TIMEOUT_S)
    finally:
        doomed.stop()


async def test_malformed_and_oversized_frames_close_the_connection(
    cluster: ExecutorSetup, session: aiohttp.ClientSession
) -> None:
    """Bad frames from a raw socket: each closes its connection, with the reason in the executor's log."""
    reduce = cluster.executors["Reduce"]
    host, port = reduce.channel.rsplit(":", 1)
    bad: Sequence[tuple[bytes, str]] = [
        (
            wire.FRAME_HEAD.pack(wire.DEFAULT_MAX_FRAME_BYTES + 1, wire.CALL, 1, 0),
            "outside this side's limits",
        ),
        (wire.encode(9, 2), "unknown kind 9"),
        (wire.encode(wire.CALL, 3, b'{"path": 5}'), "invalid CallMeta"),
        (wire.encode(wire.REPLY, 4), "is not something a caller sends"),
    ]
    for frame, reason in bad:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(frame)
            await writer.drain()
            async with asyncio.timeout(CALL_TIMEOUT_S):
                assert await reader.read() == b""  # closed by the executor, no reply
        finally:
            writer.close()
        await wait_until(lambda r=reason: _true(r in reduce.log()), f"the log to say {reason!r}")
    # The executor still serves, on HTTP and on the channel.
    async with session.get(reduce.url + "/health") as resp:
        assert resp.status == 200
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(wire.encode(wire.CALL, 1, b"", b"not json"))
        data = b""
        while len(data) < wire.FRAME_HEAD.size or len(data) < 4 + wire.LENGTH.unpack_from(data)[0]:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed before the reply"
            data += chunk
    (frame,) = wire.FrameReader().feed(data)
    assert (frame.kind, frame.request_id, wire.parse_reply(frame).status) == (wire.REPLY, 1, 400)


async def _equals(value: Any, wanted: int) -> bool:
    return bool(await value == wanted)


async def _true(value: bool) -> bool:
    return value


async def test_the_callers_trace_context_travels_in_the_call_frame(
    cluster: ExecutorSetup, channels: ExecutorChannels, tmp_path: Path
) -> None:
    """A call carrying a traceparent gives the executor's server span that parent (as an HTTP header would)."""
    lib = cluster.lib
    traced = launch_executor(
        lib.Reduce(),
        "reduce-channel-traced",
        cluster.executors["Reduce"].ranks,
        cluster.nats_url,
        cluster.log_dir,
        {TRACES_DIR_ENV: str(tmp_path)},
    )
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        await asyncio.to_thread(traced.wait_ready)
        header = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
        reply = await channels.call(traced.channel, "/invoke", b"not json", header, CALL_TIMEOUT_S)
        assert reply.status == 400
    finally:
        code = traced.stop()  # flushes its span file
    assert code == 0, traced.log()
    spans = [json.loads(line) for path in tmp_path.glob("*.jsonl") for line in path.read_text().splitlines()]
    served = [s for s in spans if s["trace_id"] == trace_id]
    assert [s["name"] for s in served] == ["POST /invoke"], spans
    assert served[0]["parent_span_id"] == parent_id and served[0]["kind"] == "SERVER"
    assert served[0]["attributes"]["cornserve.transport"] == "channel"
    assert served[0]["attributes"]["http.response.status_code"] == 400
