"""Cancellation: a caller that gives up cancels its graph in the dispatcher, down to the executor.

Real nats-server, real dispatcher processes (two replicas), stand-in task managers and executors
(aiohttp with handler cancellation: `FakeExecutor.cancelled` is set when a handler is cancelled
because the dispatcher dropped its connection). The gateway's `DispatcherClient` is the caller.
"""

from __future__ import annotations

import asyncio
import json
import types
from typing import Any, cast

import nats
import pytest
from pydantic import TypeAdapter
from tests.dispatcher.support import DispatcherReplica, StandInControlPlane

from cornserve.bus.control import (
    DISPATCH_CANCEL,
    DISPATCH_INVOKE,
    DISPATCHER_SERVICE_NAME,
    InvokeCancel,
    InvokeRequest,
)
from cornserve.dispatcher.cancel import CancelBoard
from cornserve.gateway.dispatch_client import DispatcherClient
from cornserve.task import TaskInvocation, use_graph_runner

DEADLINE = 60.0
"""Upper bound on waiting for set-up steps on a loaded 2-core machine."""
CANCEL_DEADLINE = 2.0
"""What the issue asks: the executor's work and the dispatcher's relays are gone within 2 s."""


async def dispatcher_loads(nc: nats.NATS, replicas: int) -> list[dict[str, Any]]:
    """Every replica's micro STATS `data` (graphs, relays, cancelled)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    seen: dict[str, dict[str, Any]] = {}
    try:
        async with asyncio.timeout(DEADLINE):
            while len(seen) < replicas:
                await nc.publish(f"$SRV.STATS.{DISPATCHER_SERVICE_NAME}", b"", reply=inbox)
                try:
                    while len(seen) < replicas:
                        msg = await sub.next_msg(timeout=0.5)
                        stats = json.loads(msg.data)
                        (endpoint,) = stats["endpoints"]
                        seen[stats["id"]] = endpoint["data"]
                except nats.errors.TimeoutError:
                    continue
    finally:
        await sub.unsubscribe()
    return list(seen.values())


async def wait_relays_zero(nc: nats.NATS, replicas: int, deadline_s: float) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        loads = await dispatcher_loads(nc, replicas)
        if all(load["relays"] == 0 and load["graphs"] == 0 for load in loads) or loop.time() > end:
            return loads
        await asyncio.sleep(0.05)


async def test_abandoned_stream_cancels_the_executor_and_the_relay(
    control_plane: StandInControlPlane, lib: types.ModuleType, dispatchers: list[DispatcherReplica]
) -> None:
    chat = lib.Chat()
    _, produce_tm = await control_plane.deploy(chat.produce, ranks=[1])
    gen_exec, gen_tm = await control_plane.deploy(chat.generate, ranks=[2])
    client = DispatcherClient(control_plane.nc, timeout_s=60)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            # The executor sends two items, then stalls for 300 s: only a cancel frees it soon.
            stream = await chat(lib.ChatIn(values=[1.0, 2.0, 3.0], stall_at=2))
            items = aiter(stream)
            first = await anext(items)
            assert first.index == 0
            loads = await dispatcher_loads(control_plane.nc, len(dispatchers))
            assert sum(load["relays"] for load in loads) == 1, loads
    loop = asyncio.get_running_loop()
    hung_up = loop.time()
    await stream.aclose()  # the app driver closing its stream (client gone, or its deadline)
    async with asyncio.timeout(CANCEL_DEADLINE):
        await gen_exec.cancelled.wait()  # the dispatcher hung up on the executor
        assert await gen_tm.wait_done(1, timeout=CANCEL_DEADLINE) == [gen_exec.executor_id]
    assert loop.time() - hung_up < CANCEL_DEADLINE
    loads = await wait_relays_zero(control_plane.nc, len(dispatchers), CANCEL_DEADLINE)
    assert all(load["relays"] == 0 for load in loads), loads
    assert sum(load["cancelled"] for load in loads) >= 1, loads
    assert await produce_tm.wait_done(1)


async def test_request_deadline_cancels_a_running_graph(
    control_plane: StandInControlPlane, lib: types.ModuleType, dispatchers: list[DispatcherReplica]
) -> None:
    echo = lib.Echo(label="held")
    executor, tm = await control_plane.deploy(echo, ranks=[1])
    client = DispatcherClient(control_plane.nc, timeout_s=60)  # the graph's own deadline is far away

    async def held_until_started() -> None:
        while executor.held == 0:
            await asyncio.sleep(0.02)

    with use_graph_runner(client):
        run = asyncio.create_task(echo(lib.EchoIn(text="x", hold=True)))
        async with asyncio.timeout(DEADLINE):
            await held_until_started()
        # What the gateway's --request-timeout (or a client hanging up) does to the app driver.
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    async with asyncio.timeout(CANCEL_DEADLINE):
        await executor.cancelled.wait()
        assert await tm.wait_done(1, timeout=CANCEL_DEADLINE) == [executor.executor_id]
    loads = await wait_relays_zero(control_plane.nc, len(dispatchers), CANCEL_DEADLINE)
    assert all(load["graphs"] == 0 for load in loads), loads


async def test_a_cancel_that_overtakes_its_graph_stops_it(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    echo = lib.Echo(label="overtaken")
    executor, _ = await control_plane.deploy(echo, ranks=[1])
    nc = control_plane.nc
    cancel_id = "overtaken-graph-0001"
    await nc.publish(
        DISPATCH_CANCEL, InvokeCancel(cancel_id=cancel_id, reason="test").model_dump_json().encode()
    )
    await nc.flush()
    await asyncio.sleep(0.2)  # every replica has seen the cancel
    graph = echo.trace(lib.EchoIn(text="x")).invocations
    request = InvokeRequest(
        request_id="overtaken",
        invocations=TypeAdapter(list[TaskInvocation]).dump_python(graph, mode="json"),
        cancel_id=cancel_id,
    )
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(DISPATCH_INVOKE, request.model_dump_json().encode(), timeout=1.5)
    assert executor.requests == []
    # A malformed cancel is ignored; the replicas keep serving.
    await nc.publish(DISPATCH_CANCEL, b"{not json")
    client = DispatcherClient(nc, timeout_s=30)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            out = await echo(lib.EchoIn(text="still here"))
    assert out.text == "STILL HERE"


pytestmark = pytest.mark.timeout(300)


async def test_a_graph_set_up_after_its_cancel_arrived_is_cancelled_at_once() -> None:
    """The cancel came while the replica was still setting the graph up (between its checks)."""
    board = CancelBoard(cast(Any, None))  # no subscription needed: the board's book-keeping alone
    cancel_id = "set-up-race-0001"
    assert board.cancel(InvokeCancel(cancel_id=cancel_id, reason="gone")) == 0  # nothing runs it yet
    told: list[str] = []
    task = asyncio.create_task(asyncio.sleep(60))
    board.track(cancel_id, task, told.append)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert told == ["the caller gave up"]
    other = asyncio.create_task(asyncio.sleep(60))
    board.track("another-graph-0001", other)
    assert board.cancel(InvokeCancel(cancel_id="another-graph-0001")) == 1
    with pytest.raises(asyncio.CancelledError):
        await other
    assert board.cancelled == 1
