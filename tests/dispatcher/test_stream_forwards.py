"""Stream forwards in the dispatcher: a producer of a `DataForward[Stream[T]]` still producing while
the caller already reads the result stream, and its failure ending that stream with its error.

Real nats-server and dispatcher processes; stand-in task managers and executors (support.py).
"""

from __future__ import annotations

import asyncio
import types

import pytest
from tests.dispatcher.support import StandInControlPlane

from cornserve.bus.micro import ServiceFault
from cornserve.dispatcher.graph import check_streams, tail_of
from cornserve.gateway.dispatch_client import DispatcherClient
from cornserve.task import DataForward, Stream, TaskExecutionError, TaskInvocation, Tensor, use_graph_runner

DEADLINE = 60.0


async def test_the_caller_reads_the_first_item_while_the_producer_still_produces(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    graph = lib.ThinkThenSpeak()
    think_exec, think_tm = await control_plane.deploy(graph.think, ranks=[1])
    _, speak_tm = await control_plane.deploy(graph.speak, ranks=[2])
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            # Think holds after its first item until the gate opens: a dispatcher that waited for
            # its answer before replying would never return this stream (the deadline fails the test).
            stream = await graph(lib.ThinkIn(count=4, hold_after_first=True))
            items = aiter(stream)
            first = await anext(items)
            assert think_exec.held == 1 and not think_exec.gate.is_set()
            think_exec.gate.set()
            rest = [item async for item in items]
    assert [t.text for t in [first, *rest]] == [f"said {float(i)}" for i in range(4)]
    ((_, thought),) = think_exec.requests
    assert thought["outputs"][0]["dst_sidecar_ranks"] == [[2]]
    assert await think_tm.wait_done(1) == [think_exec.executor_id]
    assert len(await speak_tm.wait_done(1)) == 1


async def test_a_producer_failing_mid_stream_ends_the_result_stream_with_its_error(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    graph = lib.ThinkThenSpeak()
    think_exec, think_tm = await control_plane.deploy(graph.think, ranks=[1])
    speak_exec, speak_tm = await control_plane.deploy(graph.speak, ranks=[2])
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    items = []
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            # Think fails only once the caller reads the stream (after the reply): the failure must
            # reach the stream, not only a reply.
            stream = await graph(lib.ThinkIn(count=4, hold_after_first=True, fail_at=2))
            with pytest.raises(TaskExecutionError, match=r"Think at position 0 .*think exploded at step 2"):
                async for item in stream:
                    items.append(item)
                    think_exec.gate.set()
            # The consumer, waiting for an item that never comes, is stopped (its request dropped).
            await asyncio.wait_for(speak_exec.cancelled.wait(), DEADLINE)
    assert [t.index for t in items] == [0, 1][: len(items)]
    assert await think_tm.wait_done(1) == [think_exec.executor_id]
    assert len(await speak_tm.wait_done(1)) == 1


async def test_a_caller_that_stops_reading_stops_the_producer_too(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    graph = lib.ThinkThenSpeak()
    think_exec, think_tm = await control_plane.deploy(graph.think, ranks=[1])
    speak_exec, speak_tm = await control_plane.deploy(graph.speak, ranks=[2])
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            stream = await graph(lib.ThinkIn(count=4, hold_after_first=True))
            items = aiter(stream)
            assert (await anext(items)).index == 0
            await items.aclose()  # type: ignore[attr-defined]
            # The caller's cancel stops the relay, and with it the producer still in the graph's tail.
            await asyncio.wait_for(think_exec.cancelled.wait(), DEADLINE)
            await asyncio.wait_for(speak_exec.cancelled.wait(), DEADLINE)
    assert await think_tm.wait_done(1) == [think_exec.executor_id]
    assert len(await speak_tm.wait_done(1)) == 1


async def test_a_producer_that_hangs_ends_the_stream_at_the_graphs_deadline(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    graph = lib.ThinkThenSpeak()
    think_exec, think_tm = await control_plane.deploy(graph.think, ranks=[1])
    await control_plane.deploy(graph.speak, ranks=[2])
    client = DispatcherClient(control_plane.nc, timeout_s=3)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            stream = await graph(lib.ThinkIn(count=4, hold_after_first=True))  # never released
            items = aiter(stream)
            assert (await anext(items)).index == 0
            # Whichever deadline fires first (the tail's, or the idle stream's), the caller hears of it.
            with pytest.raises(TaskExecutionError, match=r"deadline|sent nothing for"):
                await anext(items)
            await asyncio.wait_for(think_exec.cancelled.wait(), DEADLINE)
    assert await think_tm.wait_done(1) == [think_exec.executor_id]


def test_the_dispatcher_refuses_graphs_whose_streams_break_the_rule(lib: types.ModuleType) -> None:
    """What the static-graph check refuses while recording, a hand-made graph is refused for too."""
    hidden = DataForward[Stream[Tensor]]()
    think = TaskInvocation(
        task=lib.Think(), task_input=lib.ThinkIn(), task_output=lib.HiddenOut(hidden=hidden)
    )

    def speak() -> TaskInvocation:
        return TaskInvocation(
            task=lib.Speak(),
            task_input=lib.SpeakIn(hidden=hidden),
            task_output=Stream[lib.Token].placeholder("Speak"),
        )

    check_streams([think, speak()], "subject")  # one consumer, one stream: fine
    with pytest.raises(ServiceFault, match="Speak at position 1, Speak at position 2 stream"):
        check_streams([think, speak(), speak()], "subject")
    with pytest.raises(
        ServiceFault, match="Speak at position 1 streams; the request must name a stream_subject"
    ):
        check_streams([think, speak()], None)
    with pytest.raises(
        ServiceFault, match=f"stream forward {hidden.id} of Think at position 0 has 0 consumers"
    ):
        check_streams([think], None)


def test_only_forward_only_producers_of_stream_forwards_form_the_tail(lib: types.ModuleType) -> None:
    from cornserve.task.context import record_graph

    think_speak, _ = record_graph(lib.ThinkThenSpeak(), lib.ThinkIn())
    assert tail_of(think_speak.invocations) == {0}  # Think: only its stream forward
    chat, _ = record_graph(lib.Chat(), lib.ChatIn(values=[1.0]))
    assert tail_of(chat.invocations) == set()  # Produce's forward is a plain tensor: waited for
