"""The caller's side of dispatcher liveness, against scripted replicas on a real NATS server.

A scripted replica (a plain nats-py subscriber in the dispatchers' queue group) stands in for a
dispatcher that dies at a chosen moment — something a real process can only do at a random point.
The client under test is the gateway's real `DispatcherClient`; deadlines are short here and
every test runs under an overall timeout far below the graph deadline (300 s), so a test passes
only if the loss is noticed promptly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from tests.control.support import tensor_math as lib

from cornserve.bus.control import (
    DISPATCH_INVOKE,
    DISPATCH_QUEUE_GROUP,
    InvokeKeepalive,
    InvokeReply,
    InvokeRequest,
    StreamMessage,
)
from cornserve.gateway.dispatch_client import DispatcherClient, DispatcherLost, DispatchError
from cornserve.task import Stream, Task, TaskInput, TaskInvocation

BOUND = 30.0
"""Every test finishes well within this (the graph deadline is 300 s)."""


class SumInput(TaskInput):
    seed: int


class MatrixSum(Task[SumInput, lib.ReduceOutput]):
    def post_init(self) -> None:
        self.make = lib.MakeMatrix()
        self.reduce = lib.Reduce()

    def invoke(self, x: SumInput) -> lib.ReduceOutput:
        matrix = self.make.invoke(lib.MakeMatrixInput(seed=x.seed, rows=2, cols=2)).matrix
        return self.reduce.invoke(lib.ReduceInput(x=matrix))


class MatrixRows(Task[SumInput, Stream[lib.RowSum]]):
    def post_init(self) -> None:
        self.make = lib.MakeMatrix()
        self.rows = lib.RowSums()

    def invoke(self, x: SumInput) -> Stream[lib.RowSum]:
        matrix = self.make.invoke(lib.MakeMatrixInput(seed=x.seed, rows=2, cols=2)).matrix
        return self.rows.invoke(lib.RowSumsInput(x=matrix))


REDUCED = {"sum": 1.0, "mean": 0.25, "max": 1.0, "shape": [2, 2]}


def forward_id(req: InvokeRequest) -> str:
    """The id of the MakeMatrix → consumer forward as this request carries it."""
    return str(req.invocations[0]["task_output"]["matrix"]["id"])


class ScriptedReplica:
    """Takes graphs from the queue group and plays `script(replica, msg, request)`."""

    def __init__(self, nc: Client, name: str, script: Any) -> None:
        self.nc = nc
        self.name = name
        self.script = script
        self.requests: list[InvokeRequest] = []
        self.got = asyncio.Event()
        self._sub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(DISPATCH_INVOKE, queue=DISPATCH_QUEUE_GROUP, cb=self._on)

    async def die(self) -> None:
        """Stop taking graphs (what a killed process looks like to NATS)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for task in self._tasks:
            task.cancel()

    async def _on(self, msg: Msg) -> None:
        req = InvokeRequest.model_validate_json(msg.data)
        self.requests.append(req)
        self.got.set()
        task = asyncio.create_task(self.script(self, msg, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def keepalive(self, req: InvokeRequest, seq: int) -> None:
        assert req.keepalive_subject is not None
        message = InvokeKeepalive(request_id=req.request_id, replica_id=self.name, seq=seq)
        await self.nc.publish(req.keepalive_subject, message.model_dump_json().encode())

    async def reply(self, msg: Msg, req: InvokeRequest, outputs: list[dict[str, Any] | None]) -> None:
        await msg.respond(InvokeReply(request_id=req.request_id, outputs=outputs).model_dump_json().encode())


async def silent(replica: ScriptedReplica, msg: Msg, req: InvokeRequest) -> None:
    """Took the graph and died before acknowledging it."""


async def ack_then_silent(replica: ScriptedReplica, msg: Msg, req: InvokeRequest) -> None:
    """Acknowledged, then died."""
    await replica.keepalive(req, 0)


async def serve_slowly(replica: ScriptedReplica, msg: Msg, req: InvokeRequest) -> None:
    """Runs longer than the keepalive timeout, but keeps sending keepalives: alive, just slow."""
    for seq in range(8):
        await replica.keepalive(req, seq)
        await asyncio.sleep(0.4)
    await replica.reply(msg, req, [req.invocations[0]["task_output"], REDUCED])


async def stream_one_then_silent(replica: ScriptedReplica, msg: Msg, req: InvokeRequest) -> None:
    """Replied, relayed one stream item, then died."""
    assert req.stream_subject is not None
    await replica.keepalive(req, 0)
    await replica.reply(msg, req, [req.invocations[0]["task_output"], None])
    item = StreamMessage(seq=0, item={"index": 0, "sum": 1.5})
    await replica.nc.publish(req.stream_subject, item.model_dump_json().encode())


async def reply_then_silent_once(replica: ScriptedReplica, msg: Msg, req: InvokeRequest) -> None:
    """First graph: replied, died before the first stream item. Later graphs: stream two items."""
    assert req.stream_subject is not None
    await replica.keepalive(req, 0)
    await replica.reply(msg, req, [req.invocations[0]["task_output"], None])
    if len(replica.requests) == 1:
        return
    for seq, item in enumerate([{"index": 0, "sum": 1.0}, {"index": 1, "sum": 2.0}]):
        await replica.nc.publish(
            req.stream_subject, StreamMessage(seq=seq, item=item).model_dump_json().encode()
        )
    await replica.nc.publish(req.stream_subject, StreamMessage(seq=2, end=True).model_dump_json().encode())


async def stream_batches_out_of_order(replica: ScriptedReplica, msg: Msg, req: InvokeRequest) -> None:
    """A relay that fell behind: its second message (two items) arrives before its first (one item)."""
    assert req.stream_subject is not None
    await replica.keepalive(req, 0)
    await replica.reply(msg, req, [req.invocations[0]["task_output"], None])
    rows = [{"index": i, "sum": float(i)} for i in range(3)]
    messages = [
        StreamMessage(seq=1, items=rows[1:]),
        StreamMessage(seq=0, item=rows[0]),
        StreamMessage(seq=3, end=True),
        StreamMessage(seq=2, items=[{"index": 3, "sum": 3.0}]),
    ]
    for message in messages:
        await replica.nc.publish(req.stream_subject, message.model_dump_json().encode())


async def stream_batch_with_a_bad_item(replica: ScriptedReplica, msg: Msg, req: InvokeRequest) -> None:
    """The second item of a batch is not a RowSum."""
    assert req.stream_subject is not None
    await replica.keepalive(req, 0)
    await replica.reply(msg, req, [req.invocations[0]["task_output"], None])
    message = StreamMessage(seq=0, items=[{"index": 0, "sum": 0.0}, {"index": "not a number"}])
    await replica.nc.publish(req.stream_subject, message.model_dump_json().encode())


@pytest.fixture
async def nc(nats_url: str) -> Any:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


def client(nc: Client) -> DispatcherClient:
    return DispatcherClient(nc, timeout_s=300, keepalive_interval_s=0.3, keepalive_timeout_s=2.0)


def invocations(task: Task[Any, Any]) -> list[TaskInvocation]:
    return list(task.trace(SumInput(seed=1)).invocations)


async def test_graph_on_a_dead_replica_is_retried_with_fresh_forward_ids(nc: Client) -> None:
    dead = ScriptedReplica(nc, "dead", silent)
    alive = ScriptedReplica(nc, "alive", serve_slowly)
    graph = invocations(MatrixSum())
    original_id = graph[0].task_output.matrix.id
    async with asyncio.timeout(BOUND):
        await dead.start()
        call = asyncio.create_task(client(nc).run_graph(graph))
        await dead.got.wait()
        await dead.die()
        await alive.start()
        outputs = await call
    await alive.die()
    assert len(dead.requests) == 1 and len(alive.requests) == 1
    assert forward_id(dead.requests[0]) == original_id
    retried = alive.requests[0]
    assert forward_id(retried) != original_id  # a sidecar may still hold the dead run's forwards
    consumer_input = retried.invocations[1]["task_input"]["x"]["id"]
    assert consumer_input == forward_id(retried)  # producer and consumer renamed consistently
    assert outputs[0].matrix.id == original_id  # mapped back for the app's recorded graph
    assert outputs[1].sum == 1.0


async def test_replica_lost_twice_is_a_prompt_503(nc: Client) -> None:
    replica = ScriptedReplica(nc, "flaky", ack_then_silent)
    await replica.start()
    try:
        async with asyncio.timeout(BOUND):
            with pytest.raises(DispatcherLost) as failure:
                await client(nc).run_graph(invocations(MatrixSum()))
    finally:
        await replica.die()
    assert failure.value.code == 503 and failure.value.error == "dispatcher_lost"
    assert failure.value.replica_id == "flaky" and not failure.value.relayed
    assert "flaky" in str(failure.value) and "Retry" in str(failure.value)
    assert len(replica.requests) == 2  # the first attempt and one retry


async def test_death_after_stream_output_fails_promptly_without_retry(nc: Client) -> None:
    replica = ScriptedReplica(nc, "streamer", stream_one_then_silent)
    await replica.start()
    items: list[Any] = []
    try:
        async with asyncio.timeout(BOUND):
            outputs = await client(nc).run_graph(invocations(MatrixRows()))
            stream = outputs[-1]
            assert isinstance(stream, Stream)
            with pytest.raises(DispatcherLost) as failure:
                async for item in stream:
                    items.append(item)
    finally:
        await replica.die()
    assert [i.sum for i in items] == [1.5]
    assert failure.value.code == 503 and failure.value.relayed
    assert len(replica.requests) == 1  # output was already delivered: not retried


async def test_a_slow_replica_that_keeps_sending_keepalives_is_not_abandoned(nc: Client) -> None:
    replica = ScriptedReplica(nc, "slow", serve_slowly)
    await replica.start()
    try:
        async with asyncio.timeout(BOUND):
            outputs = await client(nc).run_graph(invocations(MatrixSum()))
    finally:
        await replica.die()
    assert outputs[1].sum == 1.0 and len(replica.requests) == 1


async def test_stream_lost_before_its_first_item_is_retried(nc: Client) -> None:
    replica = ScriptedReplica(nc, "restarting", reply_then_silent_once)
    await replica.start()
    graph = invocations(MatrixRows())
    try:
        async with asyncio.timeout(BOUND):
            outputs = await client(nc).run_graph(graph)
            stream = outputs[-1]
            assert isinstance(stream, Stream)
            items = [item async for item in stream]
    finally:
        await replica.die()
    assert [(i.index, i.sum) for i in items] == [(0, 1.0), (1, 2.0)]
    first, second = replica.requests
    assert forward_id(first) == graph[0].task_output.matrix.id != forward_id(second)
    assert outputs[0].matrix.id == graph[0].task_output.matrix.id


async def test_stream_messages_of_several_items_are_delivered_in_order(nc: Client) -> None:
    replica = ScriptedReplica(nc, "behind", stream_batches_out_of_order)
    await replica.start()
    try:
        async with asyncio.timeout(BOUND):
            stream = (await client(nc).run_graph(invocations(MatrixRows())))[-1]
            assert isinstance(stream, Stream)
            items = [item async for item in stream]
    finally:
        await replica.die()
    assert [(i.index, i.sum) for i in items] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]


async def test_a_bad_item_in_a_batch_fails_the_stream_after_the_good_ones(nc: Client) -> None:
    replica = ScriptedReplica(nc, "bad-item", stream_batch_with_a_bad_item)
    await replica.start()
    items: list[Any] = []
    try:
        async with asyncio.timeout(BOUND):
            stream = (await client(nc).run_graph(invocations(MatrixRows())))[-1]
            assert isinstance(stream, Stream)
            with pytest.raises(DispatchError, match=r"stream item 0\.1 is not a valid item") as failure:
                async for item in stream:
                    items.append(item)
    finally:
        await replica.die()
    assert [i.index for i in items] == [0]
    assert failure.value.code == 502 and failure.value.error == "executor_failed"
