"""Every static-graph rule is enforced with an error that names the task and position."""

from __future__ import annotations

import itertools

import pytest
from tests.task.helpers import (
    Generate,
    GenerateInput,
    MakeTensor,
    NumbersInput,
    Scale,
    ScaleInput,
    Sum,
    SumInput,
    SumOutput,
    Token,
    in_process,
)

from cornserve.task import (
    StaticGraphError,
    Stream,
    Task,
    TaskInput,
    UnmaterializedDataError,
    use_graph_runner,
)


class FlakyInput(TaskInput):
    values: list[float]


class ExtraCallOnReplay(Task[FlakyInput, SumOutput]):
    """Makes one more call when replayed than when recorded."""

    def post_init(self) -> None:
        self.make = MakeTensor()
        self.sum = Sum()
        self._calls = itertools.count(0)

    def invoke(self, task_input: FlakyInput) -> SumOutput:
        made = self.make.invoke(NumbersInput(values=task_input.values))
        out = self.sum.invoke(SumInput(tensors=[made.tensor]))
        if next(self._calls) > 0:
            self.sum.invoke(SumInput(tensors=[made.tensor]))
        return out


class FewerCallsOnReplay(Task[FlakyInput, SumOutput]):
    """Skips its last call when replayed."""

    def post_init(self) -> None:
        self.make = MakeTensor()
        self.sum = Sum()
        self._calls = itertools.count(0)

    def invoke(self, task_input: FlakyInput) -> SumOutput:
        made = self.make.invoke(NumbersInput(values=task_input.values))
        out = self.sum.invoke(SumInput(tensors=[made.tensor]))
        if next(self._calls) == 0:
            self.sum.invoke(SumInput(tensors=[made.tensor]))
        return out


class OtherTaskOnReplay(Task[FlakyInput, SumOutput]):
    def post_init(self) -> None:
        self.a = MakeTensor(label="a")
        self.b = MakeTensor(label="b")
        self.sum = Sum()
        self._calls = itertools.count(0)

    def invoke(self, task_input: FlakyInput) -> SumOutput:
        maker = self.a if next(self._calls) == 0 else self.b
        return self.sum.invoke(
            SumInput(tensors=[maker.invoke(NumbersInput(values=task_input.values)).tensor])
        )


class OtherInputOnReplay(Task[FlakyInput, SumOutput]):
    def post_init(self) -> None:
        self.make = MakeTensor()
        self.sum = Sum()
        self._calls = itertools.count(0)

    def invoke(self, task_input: FlakyInput) -> SumOutput:
        values = [*task_input.values, float(next(self._calls))]
        return self.sum.invoke(SumInput(tensors=[self.make.invoke(NumbersInput(values=values)).tensor]))


@pytest.mark.parametrize(
    ("task_cls", "pattern"),
    [
        (ExtraCallOnReplay, r"extra invocation: Sum at position 2, but only 2 invocations were recorded"),
        (FewerCallsOnReplay, r"made 2 of 3 recorded invocations; Sum at position 2 was not invoked again"),
        (
            OtherTaskOnReplay,
            r"invoked MakeTensor \(maketensor-\w+\) at position 0, but the recording invoked MakeTensor \(maketensor-\w+\) there",
        ),
        (OtherInputOnReplay, r"invoked MakeTensor at position 0 with a different input than was recorded"),
    ],
)
async def test_replay_must_match_recording(task_cls: type[Task], pattern: str) -> None:  # type: ignore[type-arg]
    runner, _ = in_process()
    with use_graph_runner(runner), pytest.raises(StaticGraphError, match=pattern):
        await task_cls()(FlakyInput(values=[1.0]))


async def test_replay_with_different_task_instance_names_both() -> None:
    runner, _ = in_process()
    with use_graph_runner(runner), pytest.raises(StaticGraphError) as info:
        await OtherTaskOnReplay()(FlakyInput(values=[1.0]))
    assert "position 0" in str(info.value)
    assert "same task calls in the same order" in str(info.value)


class TouchesForward(Task[FlakyInput, SumOutput]):
    def post_init(self) -> None:
        self.make = MakeTensor()
        self.sum = Sum()

    def invoke(self, task_input: FlakyInput) -> SumOutput:
        made = self.make.invoke(NumbersInput(values=task_input.values))
        if made.tensor:  # branching on forwarded data: not allowed
            pass
        return self.sum.invoke(SumInput(tensors=[made.tensor]))


class ComputesWithForward(TouchesForward):
    def invoke(self, task_input: FlakyInput) -> SumOutput:
        made = self.make.invoke(NumbersInput(values=task_input.values))
        _ = made.tensor * 2
        return self.sum.invoke(SumInput(tensors=[made.tensor]))


class ReadsForwardData(TouchesForward):
    def invoke(self, task_input: FlakyInput) -> SumOutput:
        made = self.make.invoke(NumbersInput(values=task_input.values))
        _ = made.tensor.data
        return self.sum.invoke(SumInput(tensors=[made.tensor]))


class BranchesOnOutput(Task[FlakyInput, SumOutput]):
    def post_init(self) -> None:
        self.make = MakeTensor()
        self.sum = Sum()

    def invoke(self, task_input: FlakyInput) -> SumOutput:
        made = self.make.invoke(NumbersInput(values=task_input.values))
        first = self.sum.invoke(SumInput(tensors=[made.tensor]))
        if first.total > 1:  # dynamic control flow on an unmaterialized output
            return first
        return first


@pytest.mark.parametrize("task_cls", [TouchesForward, ComputesWithForward, ReadsForwardData])
def test_touching_forward_contents_while_recording(task_cls: type[Task]) -> None:  # type: ignore[type-arg]
    with pytest.raises(
        UnmaterializedDataError, match=r"DataForward \w+ \(Tensor\) has no contents in the app driver"
    ):
        task_cls().trace(FlakyInput(values=[1.0]))


def test_branching_on_unmaterialized_output() -> None:
    with pytest.raises(UnmaterializedDataError, match="Output field 'total' of Sum was used while recording"):
        BranchesOnOutput().trace(FlakyInput(values=[1.0]))


class StreamsInTheMiddle(Task[FlakyInput, SumOutput]):
    def post_init(self) -> None:
        self.generate = Generate()
        self.make = MakeTensor()
        self.sum = Sum()

    def invoke(self, task_input: FlakyInput) -> SumOutput:
        self.generate.invoke(GenerateInput(prompt="x"))
        made = self.make.invoke(NumbersInput(values=task_input.values))
        return self.sum.invoke(SumInput(tensors=[made.tensor]))


def test_a_stream_must_be_the_result() -> None:
    with pytest.raises(
        StaticGraphError,
        match=r"Generate at position 0 produces a Stream that is not the graph's result",
    ):
        StreamsInTheMiddle().trace(FlakyInput(values=[1.0]))


class ReadsStreamWhileRecording(Task[FlakyInput, Stream[Token]]):
    def post_init(self) -> None:
        self.generate = Generate()

    def invoke(self, task_input: FlakyInput) -> Stream[Token]:
        stream = self.generate.invoke(GenerateInput(prompt="x"))
        stream.__aiter__()
        return stream


def test_reading_a_stream_while_recording() -> None:
    with pytest.raises(
        UnmaterializedDataError,
        match="stream produced by Generate at position 0 was iterated while recording",
    ):
        ReadsStreamWhileRecording().trace(FlakyInput(values=[1.0]))


class DropsAForward(Task[FlakyInput, SumOutput]):
    def post_init(self) -> None:
        self.make = MakeTensor()
        self.scale = Scale()
        self.sum = Sum()

    def invoke(self, task_input: FlakyInput) -> SumOutput:
        made = self.make.invoke(NumbersInput(values=task_input.values))
        self.scale.invoke(ScaleInput(tensor=made.tensor, factor=2.0))  # produced, never used
        return self.sum.invoke(SumInput(tensors=[made.tensor]))


def test_forward_produced_but_unused() -> None:
    with pytest.raises(
        StaticGraphError,
        match=r"DataForward \w+ \(Tensor\) produced by Scale at position 1 is neither consumed by another task nor returned",
    ):
        DropsAForward().trace(FlakyInput(values=[1.0]))


async def test_forward_from_another_graph_cannot_be_consumed() -> None:
    runner, _ = in_process()
    with use_graph_runner(runner):
        made = await MakeTensor()(NumbersInput(values=[1.0]))
        with pytest.raises(StaticGraphError, match="which no earlier task in this graph produced"):
            await Sum()(SumInput(tensors=[made.tensor]))


def test_unmaterialized_value_passed_to_another_task() -> None:
    class PassesTotal(Task[FlakyInput, SumOutput]):
        def post_init(self) -> None:
            self.make = MakeTensor()
            self.sum = Sum()
            self.gen = Generate()

        def invoke(self, task_input: FlakyInput) -> SumOutput:
            made = self.make.invoke(NumbersInput(values=task_input.values))
            total = self.sum.invoke(SumInput(tensors=[made.tensor]))
            self.gen.invoke(GenerateInput.model_construct(prompt=total.total, tensor=None, count=1))
            return total

    with pytest.raises(UnmaterializedDataError, match="was passed into the input of Generate at position 2"):
        PassesTotal().trace(FlakyInput(values=[1.0]))
