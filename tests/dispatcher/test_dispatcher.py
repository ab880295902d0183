"""The dispatcher service end to end: real nats-server, real dispatcher processes, stand-in TMs/executors."""

from __future__ import annotations

import asyncio
import json
import re
import types
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER
from tests.dispatcher.support import (
    LIBRARY,
    DispatcherReplica,
    FakeExecutor,
    StandInControlPlane,
    start_dispatchers,
    stop_dispatchers,
)
from tests.support.tasklibs import upload_library

from cornserve.bus.control import (
    DISPATCH_INVOKE,
    DISPATCH_QUEUE_GROUP,
    DISPATCHER_SERVICE_NAME,
    InvokeReply,
    InvokeRequest,
    StreamMessage,
)
from cornserve.bus.micro import RequestTimeout, ServiceErrorReply, request
from cornserve.cli.natsserver import NatsServerProcess
from cornserve.gateway.dispatch_client import DispatcherClient, DispatchError
from cornserve.task import TaskExecutionError, TaskInvocation, use_graph_runner

DEADLINE = 60.0
"""Upper bound on any single step of a test (generous for a loaded 2-core machine)."""


def wire(invocations: list[TaskInvocation]) -> list[dict[str, Any]]:
    from pydantic import TypeAdapter

    dumped: list[dict[str, Any]] = TypeAdapter(list[TaskInvocation]).dump_python(invocations, mode="json")
    return dumped


# ----- the happy paths -----------------------------------------------------------------------------


async def test_unit_task(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    echo = lib.Echo()
    executor, tm = await control_plane.deploy(echo, ranks=[7])
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            out = await echo(lib.EchoIn(text="hello"))
    assert isinstance(out, lib.EchoOut)
    assert out.text == "HELLO"
    assert out.executor == executor.executor_id
    assert await tm.wait_done(1) == [executor.executor_id]


async def test_graph_forwards_wired_to_routed_ranks(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    pipeline = lib.Pipeline()
    produce_exec, produce_tm = await control_plane.deploy(pipeline.produce, ranks=[1])
    scale_exec, scale_tm = await control_plane.deploy(pipeline.scale, ranks=[2, 3])
    sum_exec, sum_tm = await control_plane.deploy(pipeline.sum, ranks=[4])
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            out = await pipeline(lib.PipelineIn(values=[1.0, 2.0, 3.0], factor=10.0))
    assert out.total == pytest.approx(6.0 + 60.0)

    ((_, produced),) = produce_exec.requests
    ((_, scaled),) = scale_exec.requests
    ((_, summed),) = sum_exec.requests
    made = produced["outputs"][0]
    assert made["src_sidecar_ranks"] == [1]
    assert made["dst_sidecar_ranks"] == [[2, 3], [4]]  # broadcast: scale and sum consume it
    assert scaled["input"]["tensor"]["id"] == made["id"]
    assert scaled["input"]["tensor"]["src_sidecar_ranks"] == [1]
    assert scaled["outputs"][0]["src_sidecar_ranks"] == [2, 3]
    assert scaled["outputs"][0]["dst_sidecar_ranks"] == [[4]]
    consumed = summed["input"]["tensors"]
    assert [f["src_sidecar_ranks"] for f in consumed] == [[1], [2, 3]]
    assert [f["dst_sidecar_ranks"] for f in consumed] == [[[2, 3], [4]], [[4]]]

    for executor, tm in [(produce_exec, produce_tm), (scale_exec, scale_tm), (sum_exec, sum_tm)]:
        assert await tm.wait_done(1) == [executor.executor_id]


async def test_many_concurrent_graphs(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    pipeline = lib.Pipeline()
    for task, ranks in [(pipeline.produce, [1]), (pipeline.scale, [2]), (pipeline.sum, [3])]:
        await control_plane.deploy(task, ranks=ranks)
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            outs = await asyncio.gather(
                *(pipeline(lib.PipelineIn(values=[float(i)], factor=2.0)) for i in range(20))
            )
    assert [o.total for o in outs] == [pytest.approx(3.0 * i) for i in range(20)]


async def test_stream_relayed_through_nats(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    chat = lib.Chat()
    _, produce_tm = await control_plane.deploy(chat.produce, ranks=[1])
    gen_exec, gen_tm = await control_plane.deploy(chat.generate, ranks=[5])
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            stream = await chat(lib.ChatIn(values=[1.0, 2.0, 3.0, 4.0]))
            items = [item async for item in stream]
    assert [(t.index, t.text) for t in items] == [(i, f"TOK{i}") for i in range(4)]
    assert all(isinstance(t, lib.Token) for t in items)
    ((_, generated),) = gen_exec.requests
    assert generated["input"]["tensor"]["src_sidecar_ranks"] == [1]
    assert generated["input"]["tensor"]["dst_sidecar_ranks"] == [[5]]
    assert await produce_tm.wait_done(1)
    assert await gen_tm.wait_done(1) == [gen_exec.executor_id]  # after the stream ended


async def test_the_last_items_carry_the_end_when_the_response_ends_in_their_read(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    """The stand-in writes its last line and the end of its body in one write: one message less."""
    chat = lib.Chat()
    await control_plane.deploy(chat.produce, ranks=[1])
    await control_plane.deploy(chat.generate, ranks=[5])
    seen: list[StreamMessage] = []

    async def record(msg: Msg) -> None:
        if msg.subject.endswith(".stream"):
            seen.append(StreamMessage.model_validate_json(msg.data))

    sub = await control_plane.nc.subscribe("_INBOX.>", cb=record)
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    try:
        with use_graph_runner(client):
            async with asyncio.timeout(DEADLINE):
                stream = await chat(lib.ChatIn(values=[1.0, 2.0, 3.0]))
                items = [item async for item in stream]
        await control_plane.nc.flush()
    finally:
        await sub.unsubscribe()
    assert [t.index for t in items] == [0, 1, 2]
    carried = [m for m in seen if m.item is not None or m.items]
    assert sum(len(m.items or [m.item]) for m in carried) == 3
    assert [m.end for m in seen].count(True) == 1 and seen[-1].end, seen
    assert seen[-1].item is not None or seen[-1].items, "the end came alone, after the last items"
    assert seen[-1].error is None


async def _published_run(
    control_plane: StandInControlPlane, lib: types.ModuleType, inp: Any, timeout_s: float = 30
) -> tuple[list[Any], BaseException | None, list[StreamMessage], FakeExecutor]:
    """Run Chat with a `generate` executor that publishes its stream: items, the failure, the raw messages."""
    chat = lib.Chat()
    await control_plane.deploy(chat.produce, ranks=[1])
    gen_exec, _ = await control_plane.deploy(chat.generate, ranks=[5])
    gen_exec.publish_nc = control_plane.nc
    seen: list[StreamMessage] = []

    async def record(msg: Msg) -> None:
        if msg.subject.endswith(".stream"):
            seen.append(StreamMessage.model_validate_json(msg.data))

    sub = await control_plane.nc.subscribe("_INBOX.>", cb=record)
    client = DispatcherClient(control_plane.nc, timeout_s=timeout_s)
    items: list[Any] = []
    failure: BaseException | None = None
    try:
        with use_graph_runner(client):
            async with asyncio.timeout(DEADLINE):
                stream = await chat(inp)
                try:
                    async for item in stream:
                        items.append(item)
                except TaskExecutionError as exc:
                    failure = exc
        await control_plane.nc.flush()
    finally:
        await sub.unsubscribe()
    assert gen_exec.published == 1, "the dispatcher did not let the executor publish"
    return items, failure, seen, gen_exec


async def test_an_executor_may_publish_the_stream_itself(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    """The dispatcher names the caller's subject; the executor's messages are all there is (no relay's end)."""
    items, failure, seen, _ = await _published_run(control_plane, lib, lib.ChatIn(values=[1.0, 2.0, 3.0]))
    assert failure is None and [t.index for t in items] == [0, 1, 2]
    assert [(m.seq, m.end) for m in seen] == [(0, False), (1, False), (2, True)]


async def test_a_published_stream_that_fails_gets_its_error_from_the_dispatcher(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    """The executor's end line carries the failure and the count: the error is the message after its own."""
    inp = lib.ChatIn(values=[1.0, 2.0, 3.0], bad_line_at=1)
    items, failure, seen, _ = await _published_run(control_plane, lib, inp)
    assert [t.index for t in items] == [0]
    assert failure is not None and "Generate at position 1 failed while streaming" in str(failure)
    assert "not a token" in str(failure)
    # Two connections publish (the executor its items, the dispatcher the end), so the end may come
    # first on the wire; the gateway takes messages in seq order.
    ordered = sorted(seen, key=lambda m: m.seq)
    assert [(m.seq, m.end, m.abort) for m in ordered] == [(0, False, False), (1, True, False)]


async def test_a_published_stream_that_stalls_ends_with_an_abort(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    """The executor never says how many it sent: the dispatcher's end is an abort, taken whatever seq."""
    inp = lib.ChatIn(values=[1.0, 2.0, 3.0], stall_at=2)
    items, failure, seen, gen_exec = await _published_run(control_plane, lib, inp, timeout_s=1.5)
    assert [t.index for t in items] == [0, 1]
    assert failure is not None and re.search(r"sent nothing for 1\.5 s", str(failure)), failure
    assert seen[-1].abort and seen[-1].end and seen[-1].error
    async with asyncio.timeout(DEADLINE):
        await gen_exec.cancelled.wait()  # the dispatcher hung up on the stalled executor


async def test_stream_error_mid_stream(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    chat = lib.Chat()
    await control_plane.deploy(chat.produce, ranks=[1])
    await control_plane.deploy(chat.generate, ranks=[2])
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    items: list[Any] = []
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            stream = await chat(lib.ChatIn(values=[1.0, 2.0, 3.0], bad_line_at=1))
            with pytest.raises(TaskExecutionError, match="Generate at position 1 failed while streaming"):
                async for item in stream:
                    items.append(item)
    assert [t.index for t in items] == [0]


async def test_stream_idle_deadline(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    chat = lib.Chat()
    await control_plane.deploy(chat.produce, ranks=[1])
    gen_exec, gen_tm = await control_plane.deploy(chat.generate, ranks=[2])
    client = DispatcherClient(control_plane.nc, timeout_s=1.5)
    items: list[Any] = []
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            stream = await chat(lib.ChatIn(values=[1.0, 2.0, 3.0], stall_at=2))
            with pytest.raises(TaskExecutionError, match=r"sent nothing for 1\.5 s"):
                async for item in stream:
                    items.append(item)
    assert [t.index for t in items] == [0, 1]
    async with asyncio.timeout(DEADLINE):
        await gen_exec.cancelled.wait()  # the dispatcher hung up on the stalled executor
    assert await gen_tm.wait_done(1)


async def test_stream_that_fails_to_start(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    chat = lib.Chat()
    await control_plane.deploy(chat.produce, ranks=[1])
    await control_plane.deploy(chat.generate, ranks=[2])
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client), pytest.raises(DispatchError) as failure:
        async with asyncio.timeout(DEADLINE):
            await chat(lib.ChatIn(values=[1.0], fail="no tokens today"))
    assert failure.value.code == 502
    assert "Generate at position 1 failed" in str(failure.value)
    assert "no tokens today" in str(failure.value)


# ----- failures ------------------------------------------------------------------------------------


async def test_executor_refusing_its_input_keeps_the_client_error_status(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    """An executor's 400 (bad media, too many tokens) is the caller's fault: 400 with its message."""
    pipeline = lib.Pipeline()
    await control_plane.deploy(pipeline.produce, ranks=[1])
    await control_plane.deploy(pipeline.scale, ranks=[2])
    await control_plane.deploy(pipeline.sum, ranks=[3])
    client = DispatcherClient(control_plane.nc, timeout_s=600)
    with use_graph_runner(client), pytest.raises(DispatchError) as failure:
        async with asyncio.timeout(DEADLINE):
            await pipeline(lib.PipelineIn(values=[1.0], fail="reject: the image cannot be decoded"))
    err = failure.value
    assert err.code == 400 and err.error == "invalid_input"
    assert "Produce at position 0 rejected its input: the image cannot be decoded" in str(err)


async def test_failing_executor_fails_graph_promptly(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    """produce fails; scale and sum wait for its data: they are cancelled, the caller gets the error now."""
    pipeline = lib.Pipeline()
    _, produce_tm = await control_plane.deploy(pipeline.produce, ranks=[1])
    scale_exec, _ = await control_plane.deploy(pipeline.scale, ranks=[2])
    sum_exec, _ = await control_plane.deploy(pipeline.sum, ranks=[3])
    # The graph's deadline (600 s) is far beyond the test's own deadline: only a prompt failure passes.
    client = DispatcherClient(control_plane.nc, timeout_s=600)
    with use_graph_runner(client), pytest.raises(DispatchError) as failure:
        async with asyncio.timeout(DEADLINE):
            await pipeline(lib.PipelineIn(values=[1.0], fail="out of cheese"))
    err = failure.value
    assert err.code == 502 and err.error == "executor_failed"
    assert "Produce at position 0 failed" in str(err)
    assert "produce exploded: out of cheese" in str(err)  # the executor's own message
    assert err.task_name == "Produce" and err.position == 0
    async with asyncio.timeout(DEADLINE):
        await scale_exec.cancelled.wait()  # the invocations still waiting were cancelled
        await sum_exec.cancelled.wait()
    assert await produce_tm.wait_done(1)


async def test_task_not_deployed(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    ghost = lib.Echo(label="never-deployed")
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client), pytest.raises(DispatchError) as failure:
        async with asyncio.timeout(DEADLINE):
            await ghost(lib.EchoIn(text="x"))
    assert failure.value.code == 404 and failure.value.error == "task_not_deployed"
    assert "Echo at position 0 is not deployed" in str(failure.value)
    assert ghost.deployment_key in str(failure.value)


async def test_deployment_seen_without_event_then_removed(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    """A deploy whose event has not arrived is found by re-querying the RM; a removal event un-deploys."""
    echo = lib.Echo(label="quiet")
    await control_plane.deploy(echo, ranks=[1], announce=False)
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client):
        async with asyncio.timeout(DEADLINE):
            assert (await echo(lib.EchoIn(text="a"))).text == "A"
            await control_plane.remove(echo)
            with pytest.raises(DispatchError) as failure:
                await echo(lib.EchoIn(text="b"))
    assert failure.value.code == 404


async def test_graph_deadline(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    echo = lib.Echo(label="slow")
    executor, tm = await control_plane.deploy(echo, ranks=[1])
    client = DispatcherClient(control_plane.nc, timeout_s=1.0)
    with use_graph_runner(client), pytest.raises(DispatchError) as failure:
        async with asyncio.timeout(DEADLINE):
            await echo(lib.EchoIn(text="x", delay_s=300))
    assert failure.value.code == 504 and failure.value.error == "timeout"
    assert "Echo at position 0" in str(failure.value)  # names what was still running
    async with asyncio.timeout(DEADLINE):
        await executor.cancelled.wait()
    assert await tm.wait_done(1)


async def test_task_manager_not_answering(control_plane: StandInControlPlane, lib: types.ModuleType) -> None:
    silent, absent = lib.Echo(label="silent-tm"), lib.Echo(label="absent-tm")
    await control_plane.deploy(silent, ranks=[1], tm="silent")
    await control_plane.deploy(absent, ranks=[2], tm="absent")
    client = DispatcherClient(control_plane.nc, timeout_s=30)
    with use_graph_runner(client):
        for task, expected in [(silent, "did not answer"), (absent, "is not running")]:
            with pytest.raises(DispatchError) as failure:
                async with asyncio.timeout(DEADLINE):
                    await task(lib.EchoIn(text="x"))
            assert failure.value.code == 503 and failure.value.error == "task_unavailable"
            assert "Echo at position 0" in str(failure.value) and expected in str(failure.value)


async def test_malformed_requests_get_typed_errors(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    echo = lib.Echo(label="after-garbage")
    await control_plane.deploy(echo, ranks=[1])
    nc = control_plane.nc
    async with asyncio.timeout(DEADLINE):
        for garbage in [
            b"not json",
            b"{}",
            b'{"invocations": []}',
            json.dumps({"invocations": [1]}).encode(),
        ]:
            msg = await nc.request(DISPATCH_INVOKE, garbage, timeout=10)
            assert msg.headers is not None and msg.headers[ERROR_CODE_HEADER] == "400", garbage

        bad_graphs: list[tuple[list[dict[str, Any]], str]] = [
            (
                [{"task": {"name": "NoSuchTask", "config": {}}, "task_input": {}, "task_output": {}}],
                "NoSuchTask",
            ),
            (
                [
                    {
                        "task": {"name": "dispatcher-test:Echo", "config": {}},
                        "task_input": {"nope": 1},
                        "task_output": {},
                    }
                ],
                "Echo",
            ),
            ([{"unexpected": True}], "invalid invocations"),
        ]
        for invocations, expected in bad_graphs:
            with pytest.raises(ServiceErrorReply) as failure:
                await request(nc, DISPATCH_INVOKE, InvokeRequest(invocations=invocations), InvokeReply, 10)
            assert failure.value.code == "400" and failure.value.error.error == "bad_request"
            assert expected in failure.value.error.message

        # A streaming graph without a subject to relay on is refused before anything runs.
        chat = lib.Chat()
        graph = chat.trace(lib.ChatIn(values=[1.0]))
        with pytest.raises(ServiceErrorReply) as failure:
            await request(
                nc, DISPATCH_INVOKE, InvokeRequest(invocations=wire(graph.invocations)), InvokeReply, 10
            )
        assert failure.value.code == "400" and "stream_subject" in failure.value.error.message

        # Still serving.
        with use_graph_runner(DispatcherClient(nc, timeout_s=30)):
            assert (await echo(lib.EchoIn(text="ok"))).text == "OK"


async def test_replicas_registered_with_micro(
    control_plane: StandInControlPlane, dispatchers: list[DispatcherReplica]
) -> None:
    nc = control_plane.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    seen: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(DEADLINE):
        while len(seen) < len(dispatchers):
            await nc.publish(f"$SRV.INFO.{DISPATCHER_SERVICE_NAME}", b"", reply=inbox)
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            info = json.loads(msg.data)
            seen[info["metadata"]["replica_id"]] = info
    await sub.unsubscribe()
    assert set(seen) == {p.replica_id for p in dispatchers}
    for info in seen.values():
        (endpoint,) = info["endpoints"]
        assert endpoint["subject"] == DISPATCH_INVOKE
        assert endpoint["queue_group"] == DISPATCH_QUEUE_GROUP


# ----- replicas coming and going (own nats-server, own replicas) -----------------------------------


@pytest.mark.slow
async def test_replica_killed_mid_load(lib: types.ModuleType, tmp_path: Path) -> None:
    with NatsServerProcess() as server:
        await upload_library(server.url, LIBRARY)
        procs = await asyncio.to_thread(start_dispatchers, server.url, ["k1", "k2"], tmp_path)
        nc = await nats.connect(server.url)
        control_plane = StandInControlPlane(nc)
        try:
            await control_plane.start_rm()
            echo = lib.Echo(label="held")
            executor, _ = await control_plane.deploy(echo, ranks=[1])
            graph = wire(echo.trace(lib.EchoIn(text="held", hold=True)).invocations)

            async def held_call() -> InvokeReply | BaseException:
                try:
                    return await request(
                        nc, DISPATCH_INVOKE, InvokeRequest(invocations=graph, timeout_s=8), InvokeReply, 12
                    )
                except (RequestTimeout, ServiceErrorReply) as exc:
                    return exc

            in_flight = [asyncio.create_task(held_call()) for _ in range(10)]
            async with asyncio.timeout(DEADLINE):
                while executor.held < len(in_flight):  # every graph reached the executor
                    await asyncio.sleep(0.02)
            procs[0].kill()
            executor.gate.set()
            async with asyncio.timeout(DEADLINE):
                results = await asyncio.gather(*in_flight)
            answered = [r for r in results if isinstance(r, InvokeReply)]
            for r in answered:
                assert r.outputs[0] is not None and r.outputs[0]["text"] == "HELD"
            for r in results:  # graphs on the killed replica are lost: the caller's deadline says so
                assert isinstance(r, InvokeReply | RequestTimeout), r

            # The survivor takes every new graph.
            with use_graph_runner(DispatcherClient(nc, timeout_s=30)):
                async with asyncio.timeout(DEADLINE):
                    outs = await asyncio.gather(*(echo(lib.EchoIn(text=f"n{i}")) for i in range(10)))
            assert [o.text for o in outs] == [f"N{i}" for i in range(10)]
        finally:
            await control_plane.close()
            await nc.close()
            await asyncio.to_thread(stop_dispatchers, procs, ("k1",))


async def test_resource_manager_down_at_start(lib: types.ModuleType, tmp_path: Path) -> None:
    with NatsServerProcess() as server:
        await upload_library(server.url, LIBRARY)
        (proc,) = await asyncio.to_thread(start_dispatchers, server.url, ["late-rm"], tmp_path)
        nc = await nats.connect(server.url)
        control_plane = StandInControlPlane(nc)
        echo = lib.Echo(label="late")
        try:
            # Serving already, but not caught up: a task it does not know is a prompt, retryable 503
            # (it cannot tell "not deployed" from "not known yet"), not a 404.
            client = DispatcherClient(nc, timeout_s=30)
            with use_graph_runner(client), pytest.raises(DispatchError) as failure:
                async with asyncio.timeout(DEADLINE):
                    await echo(lib.EchoIn(text="x"))
            assert failure.value.code == 503 and failure.value.error == "task_unavailable", failure.value
            assert "not caught up with the resource manager" in str(failure.value)

            await control_plane.deploy(echo, ranks=[1], announce=False)
            await control_plane.start_rm()
            await proc.wait_log("caught up with the resource manager: 1 deployment(s)", DEADLINE)
            queries = control_plane.state_queries
            with use_graph_runner(client):
                async with asyncio.timeout(DEADLINE):
                    assert (await echo(lib.EchoIn(text="x"))).text == "X"
            assert control_plane.state_queries == queries  # served from the caught-up cache
        finally:
            await control_plane.close()
            await nc.close()
            await asyncio.to_thread(stop_dispatchers, [proc])


async def test_sigterm_drains_then_fails_what_is_left(lib: types.ModuleType, tmp_path: Path) -> None:
    """SIGTERM: the replica stops taking graphs, gives running ones its drain time, then fails them typed."""
    with NatsServerProcess() as server:
        await upload_library(server.url, LIBRARY)
        proc = DispatcherReplica(server.url, "draining", tmp_path, "--drain-timeout", "1")
        await asyncio.to_thread(proc.wait_ready)
        nc = await nats.connect(server.url)
        control_plane = StandInControlPlane(nc)
        try:
            await control_plane.start_rm()
            echo = lib.Echo(label="drain")
            executor, tm = await control_plane.deploy(echo, ranks=[1])
            graph = wire(echo.trace(lib.EchoIn(text="held", hold=True)).invocations)
            call = asyncio.create_task(
                request(nc, DISPATCH_INVOKE, InvokeRequest(invocations=graph, timeout_s=120), InvokeReply, 60)
            )
            async with asyncio.timeout(DEADLINE):
                while executor.held < 1:
                    await asyncio.sleep(0.02)
            code = await asyncio.to_thread(proc.stop)
            with pytest.raises(ServiceErrorReply) as failure:
                async with asyncio.timeout(DEADLINE):
                    await call
            assert failure.value.code == "503" and failure.value.error.error == "shutting_down"
            assert code == 0 and "Traceback" not in proc.log()
            assert await tm.wait_done(1)
        finally:
            await control_plane.close()
            await nc.close()
            if proc.proc.poll() is None:
                proc.kill()


async def test_graphs_beyond_max_graphs_are_refused_with_429(lib: types.ModuleType, tmp_path: Path) -> None:
    """A replica running `--max-graphs` graphs refuses the next at once (429 `overloaded`), then serves again."""
    with NatsServerProcess() as server:
        await upload_library(server.url, LIBRARY)
        proc = DispatcherReplica(server.url, "bounded", tmp_path, "--max-graphs", "1")
        await asyncio.to_thread(proc.wait_ready)
        nc = await nats.connect(server.url)
        control_plane = StandInControlPlane(nc)
        try:
            await control_plane.start_rm()
            echo = lib.Echo(label="bounded")
            executor, _ = await control_plane.deploy(echo, ranks=[1])
            held = wire(echo.trace(lib.EchoIn(text="held", hold=True)).invocations)
            call = asyncio.create_task(
                request(nc, DISPATCH_INVOKE, InvokeRequest(invocations=held, timeout_s=60), InvokeReply, 60)
            )
            async with asyncio.timeout(DEADLINE):
                while executor.held < 1:
                    await asyncio.sleep(0.02)
            client = DispatcherClient(nc, timeout_s=30)
            with use_graph_runner(client), pytest.raises(DispatchError) as refused:
                async with asyncio.timeout(DEADLINE):
                    await echo(lib.EchoIn(text="second"))
            err = refused.value
            assert (err.code, err.error, err.retry_after_s) == (429, "overloaded", 1.0)
            assert "--max-graphs 1" in str(err)
            assert "refused 1 graph(s) with 429 overloaded" in proc.log()
            executor.gate.set()
            async with asyncio.timeout(DEADLINE):
                assert (await call).outputs[0] == {"text": "HELD", "executor": executor.executor_id}
                with use_graph_runner(client):
                    assert (await echo(lib.EchoIn(text="third"))).text == "THIRD"
        finally:
            await control_plane.close()
            await nc.close()
            await asyncio.to_thread(stop_dispatchers, [proc])
