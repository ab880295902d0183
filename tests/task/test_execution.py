"""`await task(input)`: record, run, replay — with real array math in in-process executors."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from tests.task.helpers import (
    Chat,
    MakeTensor,
    NumbersInput,
    Pipeline,
    PipelineInput,
    Sum,
    SumOutput,
    Token,
    TwoPipelines,
    in_process,
    make_executors,
)

from cornserve.task import (
    ExecutorRequest,
    InProcessRunner,
    LocalForwardStore,
    NoGraphRunnerError,
    Stream,
    TaskContextError,
    TaskExecutionError,
    use_graph_runner,
)


async def test_pipeline_executes_fan_out_and_fan_in() -> None:
    runner, _ = in_process()
    with use_graph_runner(runner):
        out = await Pipeline()(PipelineInput(values=[1, 2, 3], factors=[2, 10]))
    assert isinstance(out, SumOutput)
    assert out.total == pytest.approx(6 * 2 + 6 * 10)
    assert runner.graphs_run == 1


async def test_nested_composites_execute_in_recorded_order() -> None:
    log: list[str] = []
    runner, _ = in_process(log)
    task = TwoPipelines(first=Pipeline(), second=Pipeline())
    with use_graph_runner(runner):
        out = await task(PipelineInput(values=[1.0], factors=[3.0]))
    assert out.total == pytest.approx(3.0)
    assert sorted(log) == sorted(["/maketensor", "/scale", "/sum"] * 2)


async def test_concurrent_calls_are_isolated() -> None:
    runner, _ = in_process()
    seen_graph_sizes: list[int] = []
    real_run_graph = runner.run_graph

    async def counting(invocations: Any) -> Any:
        seen_graph_sizes.append(len(invocations))
        await asyncio.sleep(0.001)
        return await real_run_graph(invocations)

    runner.run_graph = counting  # type: ignore[method-assign]
    pipeline = Pipeline()
    inputs = [PipelineInput(values=[float(i)], factors=[1.0] * (1 + i % 4)) for i in range(40)]
    with use_graph_runner(runner):
        outs = await asyncio.gather(*(pipeline(x) for x in inputs))
    for i, (x, out) in enumerate(zip(inputs, outs, strict=True)):
        assert out.total == pytest.approx(i * len(x.factors)), i
    # Each call ran exactly its own graph: make + one scale per factor + sum.
    assert sorted(seen_graph_sizes) == sorted(2 + len(x.factors) for x in inputs)


async def test_streaming_output_with_transform() -> None:
    runner, _ = in_process()
    with use_graph_runner(runner):
        stream = await Chat()(NumbersInput(values=[1, 2, 3, 4]))
    assert isinstance(stream, Stream)
    items = [tok async for tok in stream]
    assert [t.index for t in items] == [0, 1, 2, 3]
    assert all(isinstance(t, Token) and t.text.startswith("TOK") and t.text.endswith(":10") for t in items)
    with pytest.raises(Exception, match="already consumed"):
        async for _ in stream:
            pass


async def test_failing_invocation_fails_graph_promptly_with_its_message() -> None:
    store = LocalForwardStore()
    executors = make_executors(store)

    async def broken(req: ExecutorRequest) -> Any:
        raise RuntimeError("sum executor exploded")

    executors[Sum] = broken
    runner = InProcessRunner(executors, timeout=30)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with (
        use_graph_runner(runner),
        pytest.raises(TaskExecutionError, match="sum executor exploded") as info,
    ):
        await Pipeline()(PipelineInput(values=[1], factors=[1]))
    assert info.value.task_name == "Sum"
    assert info.value.position == 2
    assert loop.time() - start < 10  # failed promptly, not at the graph timeout


async def test_graph_deadline() -> None:
    store = LocalForwardStore()
    executors = make_executors(store)

    async def hangs(req: ExecutorRequest) -> Any:
        await asyncio.sleep(3600)

    executors[Sum] = hangs
    with (
        use_graph_runner(InProcessRunner(executors, timeout=0.2)),
        pytest.raises(TaskExecutionError, match=r"within 0\.2 s"),
    ):
        await Pipeline()(PipelineInput(values=[1], factors=[1]))


async def test_no_graph_runner_configured() -> None:
    with pytest.raises(NoGraphRunnerError, match="no graph runner is configured"):
        await Pipeline()(PipelineInput(values=[1], factors=[1]))


async def test_unit_task_called_directly_returns_its_forward() -> None:
    runner, _ = in_process()
    with use_graph_runner(runner):
        out = await MakeTensor()(NumbersInput(values=[1.0]))
    assert out.tensor.src_sidecar_ranks == [0]
    assert out.tensor.dst_sidecar_ranks == []


def test_invoke_outside_a_call_is_a_clear_error() -> None:
    with pytest.raises(TaskContextError, match="outside of a task call"):
        MakeTensor().invoke(NumbersInput(values=[1.0]))


async def test_input_given_as_dict_is_validated() -> None:
    runner, _ = in_process()
    with use_graph_runner(runner):
        out = await Pipeline()({"values": [2.0], "factors": [2.0]})  # type: ignore[arg-type]
    assert out.total == pytest.approx(4.0)
    with pytest.raises(TypeError, match="takes a PipelineInput"):
        await Pipeline()(42)  # type: ignore[arg-type]


async def test_many_sequential_calls_do_not_leak_contexts() -> None:
    runner, _ = in_process()
    pipeline = Pipeline()
    with use_graph_runner(runner):
        for i in itertools.islice(itertools.count(), 20):
            assert (await pipeline(PipelineInput(values=[i], factors=[1.0]))).total == pytest.approx(i)
