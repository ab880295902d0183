"""Executor processes launched from PythonExecutorDescriptor, driven over HTTP with real sidecars.

A composite chains MakeMatrix → MatMul → Reduce (and → RowSums for the stream) with DataForward
edges; the tensors travel between executor processes through real sidecar servers, and every
result is checked against the same math done directly in torch.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import aiohttp
import nats
import pytest
import torch
from tests.executor.support import ExecutorSetup, HttpRunner, launch_executor
from tests.support.tasklibs import TENSOR_MATH
from tests.support.waiting import wait_for

from cornserve.bus.micro import request
from cornserve.bus.sidecar import StatsReply, StatsRequest
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.task import Stream, Task, TaskExecutionError, TaskInput, use_graph_runner


class PipelineInput(TaskInput):
    seed_a: int
    seed_b: int
    n: int = 6
    k: int = 5
    m: int = 4
    scale: float = 0.5
    fail: bool = False
    fail_after: int | None = None


def composites(lib: ModuleType) -> tuple[type[Task[Any, Any]], type[Task[Any, Any]]]:
    """The composites, built on the library's classes (which exist only once it is loaded)."""

    def product(self: Any, x: PipelineInput) -> Any:
        a = self.make.invoke(lib.MakeMatrixInput(seed=x.seed_a, rows=x.n, cols=x.k))
        b = self.make.invoke(lib.MakeMatrixInput(seed=x.seed_b, rows=x.k, cols=x.m))
        return self.matmul.invoke(lib.MatMulInput(a=a.matrix, b=b.matrix, scale=x.scale, fail=x.fail))

    class MatrixPipeline(Task[PipelineInput, lib.ReduceOutput]):  # type: ignore[name-defined]
        def post_init(self) -> None:
            self.make = lib.MakeMatrix()
            self.matmul = lib.MatMul()
            self.reduce = lib.Reduce()

        def invoke(self, x: PipelineInput) -> Any:
            return self.reduce.invoke(lib.ReduceInput(x=product(self, x).matrix))

    class RowsPipeline(Task[PipelineInput, Stream[lib.RowSum]]):  # type: ignore[name-defined]
        def post_init(self) -> None:
            self.make = lib.MakeMatrix()
            self.matmul = lib.MatMul()
            self.rows = lib.RowSums()

        def invoke(self, x: PipelineInput) -> Any:
            return self.rows.invoke(lib.RowSumsInput(x=product(self, x).matrix, fail_after=x.fail_after))

    return MatrixPipeline, RowsPipeline


def expected(lib: ModuleType, x: PipelineInput) -> torch.Tensor:
    a = lib.make_matrix_tensor(x.seed_a, x.n, x.k)
    b = lib.make_matrix_tensor(x.seed_b, x.k, x.m)
    return lib.matmul_tensor(a, b, x.scale)


def assert_reduced(out: Any, c: torch.Tensor) -> None:
    assert out.shape == list(c.shape)
    assert out.sum == pytest.approx(float(c.sum()), rel=1e-5, abs=1e-5)
    assert out.mean == pytest.approx(float(c.mean()), rel=1e-5, abs=1e-5)
    assert out.max == pytest.approx(float(c.max()), rel=1e-5, abs=1e-5)


async def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    await wait_for(predicate, timeout, what)


async def arenas_empty(cluster: ExecutorSetup) -> bool:
    nc = await nats.connect(cluster.nats_url)
    try:
        for s in cluster.sidecars:
            stats = await request(
                nc, sidecar_subject(s.rank, SidecarVerb.STATS), StatsRequest(), StatsReply, 5.0
            )
            if stats.used_bytes:
                return False
        return True
    finally:
        await nc.close()


async def all_idle(cluster: ExecutorSetup, session: aiohttp.ClientSession) -> bool:
    for e in cluster.executors.values():
        async with session.get(e.url + "/health") as resp:
            if resp.status != 200 or (await resp.json())["in_flight"] != 0:
                return False
    return True


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as s:
        yield s


async def test_health_and_info(cluster: ExecutorSetup, session: aiohttp.ClientSession) -> None:
    for name, e in cluster.executors.items():
        async with session.get(e.url + "/health") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok", "executor_id": e.executor_id, "in_flight": 0}
        async with session.get(e.url + "/info") as resp:
            info = await resp.json()
        assert info["task_key"] == e.task.deployment_key
        assert info["task"]["name"] == f"{TENSOR_MATH.name}:{name}"
        assert info["handler"] == e.task.descriptor.handler
        assert info["sidecar_ranks"] == e.ranks


async def test_traced_graph_over_http_matches_torch(
    cluster: ExecutorSetup, session: aiohttp.ClientSession
) -> None:
    lib = cluster.lib
    pipeline_cls, _ = composites(lib)
    x = PipelineInput(seed_a=1, seed_b=2, n=7, k=3, m=5, scale=2.0)
    graph = pipeline_cls().trace(x)
    assert [type(inv.task).__name__ for inv in graph.invocations] == [
        "MakeMatrix",
        "MakeMatrix",
        "MatMul",
        "Reduce",
    ]
    assert [(p, c) for p, c, _ in graph.edges] == [(0, 2), (1, 2), (2, 3)]

    dispatcher = HttpRunner(cluster.by_key(), session)
    wire = dispatcher.route(graph.invocations)
    make, matmul, reduce = (cluster.executors[n].ranks for n in ("MakeMatrix", "MatMul", "Reduce"))
    fwd_a = wire[0].task_output.matrix
    assert fwd_a.src_sidecar_ranks == make and fwd_a.dst_sidecar_ranks == [matmul]
    assert wire[3].task_input.x.src_sidecar_ranks == matmul and wire[3].task_input.x.dst_sidecar_ranks == [
        reduce
    ]

    # Every request concurrently, each built and parsed by the task's own descriptor.
    outputs = await asyncio.gather(*(dispatcher.run_one(i, inv) for i, inv in enumerate(wire)))
    assert outputs[0].matrix.id == fwd_a.id and outputs[0].matrix.dst_sidecar_ranks == [matmul]
    assert outputs[2].matrix.src_sidecar_ranks == matmul
    assert_reduced(outputs[3], expected(lib, x))
    await wait_until(lambda: arenas_empty(cluster), "every forwarded tensor released")


async def test_concurrent_awaited_graphs(cluster: ExecutorSetup, session: aiohttp.ClientSession) -> None:
    lib = cluster.lib
    pipeline = composites(lib)[0]()
    inputs = [
        PipelineInput(seed_a=i, seed_b=100 + i, n=4 + i % 3, k=8, m=3 + i % 2, scale=0.25 * i)
        for i in range(8)
    ]
    with use_graph_runner(HttpRunner(cluster.by_key(), session)):
        results = await asyncio.gather(*(pipeline(x) for x in inputs))
    for x, out in zip(inputs, results, strict=True):
        assert isinstance(out, lib.ReduceOutput)
        assert_reduced(out, expected(lib, x))
    await wait_until(lambda: arenas_empty(cluster), "every forwarded tensor released")
    await wait_until(lambda: all_idle(cluster, session), "executors idle")


async def test_streamed_rows(cluster: ExecutorSetup, session: aiohttp.ClientSession) -> None:
    lib = cluster.lib
    rows = composites(lib)[1]()
    x = PipelineInput(seed_a=5, seed_b=6, n=9, k=4, m=3, scale=1.5)
    with use_graph_runner(HttpRunner(cluster.by_key(), session)):
        stream = await rows(x)
    items = [item async for item in stream]
    want = expected(lib, x).sum(dim=1)
    assert [item.index for item in items] == list(range(9))
    assert all(isinstance(item, lib.RowSum) for item in items)
    assert [item.sum for item in items] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)


async def test_rows_streamed_between_executors_through_the_sidecar(
    cluster: ExecutorSetup, session: aiohttp.ClientSession
) -> None:
    """MakeMatrix → StreamRows ⇢ SumRows: a stream forward, one row per chunk, window of 2."""
    lib = cluster.lib

    class StreamedSums(Task[PipelineInput, Stream[lib.RowSum]]):  # type: ignore[name-defined]
        def post_init(self) -> None:
            self.make = lib.MakeMatrix()
            self.stream = lib.StreamRows()
            self.sums = lib.SumRows()

        def invoke(self, x: PipelineInput) -> Any:
            made = self.make.invoke(lib.MakeMatrixInput(seed=x.seed_a, rows=x.n, cols=x.k))
            rows = self.stream.invoke(lib.StreamRowsInput(x=made.matrix, window=2)).rows
            return self.sums.invoke(lib.SumRowsInput(rows=rows))

    x = PipelineInput(seed_a=11, seed_b=0, n=12, k=5)
    task = StreamedSums()
    graph = task.trace(x)
    assert "t1 -.->|Stream[Tensor]" in graph.to_mermaid()
    with use_graph_runner(HttpRunner(cluster.by_key(), session)):
        stream = await task(x)
    items = [item async for item in stream]
    want = lib.make_matrix_tensor(x.seed_a, x.n, x.k).sum(dim=1)
    assert [item.index for item in items] == list(range(12))
    assert [item.sum for item in items] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)
    await wait_until(lambda: arenas_empty(cluster), "every streamed row released")


async def test_stream_fails_mid_way(cluster: ExecutorSetup, session: aiohttp.ClientSession) -> None:
    rows = composites(cluster.lib)[1]()
    with use_graph_runner(HttpRunner(cluster.by_key(), session)):
        stream = await rows(PipelineInput(seed_a=1, seed_b=1, n=6, k=2, m=2, fail_after=2))
    got = []
    with pytest.raises(TaskExecutionError, match=r"^ValueError: RowSums was asked to fail after 2 rows$"):
        async for item in stream:
            got.append(item.index)
    assert got == [0, 1]
    await wait_until(lambda: all_idle(cluster, session), "executors idle")


async def test_handler_failure(cluster: ExecutorSetup, session: aiohttp.ClientSession) -> None:
    lib = cluster.lib
    # One failing executor call: HTTP 500 with "<Type>: <message>".
    make = cluster.executors["MakeMatrix"]
    graph = make.task.trace(lib.MakeMatrixInput(seed=3, rows=2, cols=2, fail=True))
    inv = graph.invocations[0]
    body = make.task.descriptor.to_request(make.task, inv).body
    async with session.post(make.url + "/invoke", json=body) as resp:
        assert resp.status == 500
        assert await resp.json() == {"error": "ValueError: MakeMatrix was asked to fail (seed=3)"}

    # A failure in the middle of a graph fails it promptly; the consumer waiting downstream is cancelled.
    pipeline = composites(lib)[0]()
    dispatcher = HttpRunner(cluster.by_key(), session)
    with (
        use_graph_runner(dispatcher),
        pytest.raises(TaskExecutionError, match=r"^ValueError: MatMul was asked to fail"),
    ):
        await pipeline(PipelineInput(seed_a=1, seed_b=2, fail=True))
    assert 500 in dispatcher.responses
    await wait_until(lambda: all_idle(cluster, session), "the cancelled Reduce request left its executor")
    await wait_until(lambda: arenas_empty(cluster), "every forwarded tensor released")

    # The executors keep serving.
    x = PipelineInput(seed_a=8, seed_b=9)
    with use_graph_runner(HttpRunner(cluster.by_key(), session)):
        assert_reduced(await pipeline(x), expected(lib, x))


async def test_bad_requests(cluster: ExecutorSetup, session: aiohttp.ClientSession) -> None:
    lib = cluster.lib
    reduce = cluster.executors["Reduce"]
    matmul_graph = composites(lib)[0]().trace(PipelineInput(seed_a=1, seed_b=2))
    matmul_body = matmul_graph.invocations[2].model_dump(mode="json")
    reduce_body = matmul_graph.invocations[3].model_dump(mode="json")
    bad_input = {**reduce_body, "task_input": {"x": "not a forward"}}
    unknown = {**reduce_body, "task": {"name": "NoSuchTask", "config": {}}}
    cases: list[tuple[Any, str]] = [
        (b"not json", "not JSON"),
        ([1, 2], "must be a task invocation"),
        ({"task_input": {}}, "must be a task invocation"),
        (matmul_body, "this executor runs reduce-"),
        (bad_input, "invalid input for Reduce"),
        (unknown, "unknown unit task 'NoSuchTask'"),
    ]
    for payload, message in cases:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        async with session.post(reduce.url + "/invoke", data=data) as resp:
            assert resp.status == 400, (payload, await resp.text())
            error = (await resp.json())["error"]
            assert message in error, error
    async with session.get(reduce.url + "/health") as resp:
        assert resp.status == 200


async def test_invocations_beyond_max_in_flight_are_refused_with_429(
    cluster: ExecutorSetup, session: aiohttp.ClientSession
) -> None:
    """`--max-in-flight 1`: while one invocation runs, the next is 429 with Retry-After at once."""
    lib = cluster.lib
    ranks = cluster.executors["Reduce"].ranks
    bounded = launch_executor(
        lib.Reduce(),
        "reduce-bounded",
        ranks,
        cluster.nats_url,
        cluster.log_dir,
        {"CORNSERVE_MAX_IN_FLIGHT": "1"},
    )
    try:
        await asyncio.to_thread(bounded.wait_ready)
        graph = composites(lib)[0]().trace(PipelineInput(seed_a=3, seed_b=4))
        # Reduce's input is MatMul's forward, which never comes: the handler waits on its sidecar.
        waiting_body = json.dumps(graph.invocations[3].model_dump(mode="json")).encode()
        waiting = asyncio.create_task(session.post(bounded.url + "/invoke", data=waiting_body))

        async def one_in_flight() -> bool:
            async with session.get(bounded.url + "/health") as resp:
                return bool((await resp.json())["in_flight"] == 1)

        await wait_until(one_in_flight, "the first invocation to be running")
        async with session.post(bounded.url + "/invoke", data=waiting_body) as resp:
            assert resp.status == 429, await resp.text()
            assert resp.headers["Retry-After"] == "1"
            assert "--max-in-flight" in (await resp.json())["error"]
        waiting.cancel()  # the client goes away: the handler is cancelled and its slot freed

        async def idle() -> bool:
            async with session.get(bounded.url + "/health") as resp:
                return bool((await resp.json())["in_flight"] == 0)

        await wait_until(idle, "the cancelled invocation to leave")
    finally:
        code = bounded.stop()
    assert code == 0, bounded.log()


async def test_sigterm_stops_cleanly(cluster: ExecutorSetup, session: aiohttp.ClientSession) -> None:
    lib = cluster.lib
    rank = cluster.executors["Reduce"].ranks
    extra = launch_executor(lib.Reduce(), "reduce-extra", rank, cluster.nats_url, cluster.log_dir)
    try:
        await asyncio.to_thread(extra.wait_ready)
    finally:
        code = extra.stop()
    assert code == 0, extra.log()
    assert "executor reduce-extra stopped" in extra.log()
    assert extra.proc.poll() == 0


async def test_startup_failures_exit_with_a_message(cluster: ExecutorSetup) -> None:
    lib = cluster.lib
    ranks = cluster.executors["Reduce"].ranks
    no_handler = lib.Reduce(descriptor=lib.ReduceExecutor(handler="no_such_handler"))
    e = launch_executor(no_handler, "reduce-broken", ranks, cluster.nats_url, cluster.log_dir)
    assert await asyncio.to_thread(e.service.wait_exit, 60) == 1
    assert "defines no function of that name" in e.log(), e.log()

    cmd = [
        sys.executable, "-m", "cornserve.executor",
        "--task-json", json.dumps({"name": "NoSuchTask", "config": {}}),
        "--executor-id", "unknown-0", "--port", str(e.port), "--nats-url", cluster.nats_url,
        "--library-wait", "1",
    ]  # fmt: skip
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert b"unknown unit task 'NoSuchTask'" in proc.stderr, proc.stderr.decode()
