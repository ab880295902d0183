"""Streams inside a graph: stream forwards (`DataForward[Stream[T]]`) and where a `Stream` may be.

The rule: every stream has exactly one consumer (a stream forward) or is the graph's result (a
`Stream` output, at any position); each violation names the task and position.
"""

from __future__ import annotations

import pytest
from tests.task.helpers import (
    Generate,
    GenerateInput,
    JSONDescriptor,
    MakeTensor,
    NumbersInput,
    TensorOutput,
    Token,
)

from cornserve.task import (
    DataForward,
    StaticGraphError,
    Stream,
    Task,
    TaskInput,
    TaskOutput,
    Tensor,
    UnitTask,
)
from cornserve.task.stream import is_stream_forward


class PromptInput(TaskInput):
    prompt: str


class HiddenOutput(TaskOutput):
    hidden: DataForward[Stream[Tensor]]


class FromHiddenInput(TaskInput):
    hidden: DataForward[Stream[Tensor]]


class Think(UnitTask[PromptInput, HiddenOutput]):
    """Produces one tensor per step, streamed to its consumer chunk by chunk."""

    default_descriptor = "ThinkDescriptor"


class Speak(UnitTask[FromHiddenInput, Stream[Token]]):
    """Consumes a stream forward, streams tokens to the caller."""

    default_descriptor = "SpeakDescriptor"

    def make_output_placeholder(self, task_input: FromHiddenInput) -> Stream[Token]:
        return Stream[Token].placeholder(self.display_name())


class ThinkDescriptor(JSONDescriptor[Think]):
    pass


class SpeakDescriptor(JSONDescriptor[Speak]):
    pass


class ThinkThenSpeak(Task[PromptInput, Stream[Token]]):
    def post_init(self) -> None:
        self.think = Think()
        self.speak = Speak()

    def invoke(self, task_input: PromptInput) -> Stream[Token]:
        hidden = self.think.invoke(task_input).hidden
        return self.speak.invoke(FromHiddenInput(hidden=hidden))


def test_a_stream_forward_with_one_consumer_is_a_dashed_edge() -> None:
    graph = ThinkThenSpeak().trace(PromptInput(prompt="hi"))
    ((producer, consumer, fid),) = graph.edges
    assert (producer, consumer) == (0, 1)
    (hidden,) = [f for f in [graph.invocations[0].task_output.hidden]]  # type: ignore[attr-defined]
    assert hidden.id == fid and hidden.data_type == "Stream[Tensor]" and is_stream_forward(hidden)
    assert not is_stream_forward(DataForward[Tensor]())
    mermaid = graph.to_mermaid()
    assert f"t0 -.->|Stream[Tensor] {fid[:8]}| t1" in mermaid
    assert "t1 -.->|stream| out" in mermaid
    assert "style=dashed" in graph.to_dot()
    assert f"produces: {fid[:8]} (stream)" in graph.describe()
    assert f"consumes: {fid[:8]} (stream)" in graph.describe()


class Pool(UnitTask[FromHiddenInput, TensorOutput]):
    """Consumes a stream forward into one tensor."""

    default_descriptor = "PoolDescriptor"


class PoolDescriptor(JSONDescriptor[Pool]):
    pass


class TwoTensors(TaskOutput):
    first: DataForward[Tensor]
    second: DataForward[Tensor]


class PoolsTwice(Task[PromptInput, TwoTensors]):
    def post_init(self) -> None:
        self.think = Think()
        self.pool = Pool()

    def invoke(self, task_input: PromptInput) -> TwoTensors:
        hidden = self.think.invoke(task_input).hidden
        first = self.pool.invoke(FromHiddenInput(hidden=hidden)).tensor
        return TwoTensors(first=first, second=self.pool.invoke(FromHiddenInput(hidden=hidden)).tensor)


class NobodyListens(Task[PromptInput, HiddenOutput]):
    def post_init(self) -> None:
        self.think = Think()

    def invoke(self, task_input: PromptInput) -> HiddenOutput:
        return self.think.invoke(task_input)


def test_a_stream_forward_has_exactly_one_consumer() -> None:
    with pytest.raises(
        StaticGraphError,
        match=r"DataForward \w+ \(Stream\[Tensor\]\) produced by Think at position 0 is a stream consumed by "
        r"2 tasks \(Pool at position 1, Pool at position 2\)",
    ):
        PoolsTwice().trace(PromptInput(prompt="hi"))
    with pytest.raises(
        StaticGraphError,
        match=r"DataForward \w+ \(Stream\[Tensor\]\) produced by Think at position 0 is a stream returned but "
        r"consumed by no task",
    ):
        NobodyListens().trace(PromptInput(prompt="hi"))


class TokensAndTensor(TaskOutput):
    tokens: Stream[Token]
    tensor: DataForward[Tensor]


class StreamsThenMakes(Task[PromptInput, TokensAndTensor]):
    """The result's stream comes from position 0; another task follows it."""

    def post_init(self) -> None:
        self.generate = Generate()
        self.make = MakeTensor()

    def invoke(self, task_input: PromptInput) -> TokensAndTensor:
        stream = self.generate.invoke(GenerateInput(prompt=task_input.prompt))
        made = self.make.invoke(NumbersInput(values=[1.0]))
        return TokensAndTensor(tokens=stream.transform(lambda tok: tok), tensor=made.tensor)


def test_the_result_stream_may_come_from_any_position() -> None:
    graph = StreamsThenMakes().trace(PromptInput(prompt="hi"))
    assert [type(inv.task).__name__ for inv in graph.invocations] == ["Generate", "MakeTensor"]
    assert graph.stream_position() == 0
    assert "t0 -.->|stream| out" in graph.to_mermaid()


class TwoStreams(Task[PromptInput, Stream[Token]]):
    def post_init(self) -> None:
        self.generate = Generate()

    def invoke(self, task_input: PromptInput) -> Stream[Token]:
        self.generate.invoke(GenerateInput(prompt="first"))
        return self.generate.invoke(GenerateInput(prompt="second"))


class StreamIntoInput(TaskInput):
    tokens: Stream[Token]


class TakesStream(UnitTask[StreamIntoInput, HiddenOutput]):
    default_descriptor = "TakesStreamDescriptor"


class TakesStreamDescriptor(JSONDescriptor[TakesStream]):
    pass


class PassesStream(Task[PromptInput, HiddenOutput]):
    def post_init(self) -> None:
        self.generate = Generate()
        self.take = TakesStream()

    def invoke(self, task_input: PromptInput) -> HiddenOutput:
        stream = self.generate.invoke(GenerateInput(prompt="x"))
        return self.take.invoke(StreamIntoInput(tokens=stream))


def test_a_stream_that_is_not_the_result_is_refused() -> None:
    with pytest.raises(
        StaticGraphError,
        match=r"Generate at position 0 produces a Stream that is not the graph's result; .* "
        r"give the producer a DataForward\[Stream\[T\]\] output",
    ):
        TwoStreams().trace(PromptInput(prompt="hi"))
    with pytest.raises(
        StaticGraphError,
        match=r"TakesStream at position 1 takes the Stream produced by Generate at position 0 in its input",
    ):
        PassesStream().trace(PromptInput(prompt="hi"))


class TwoTokenStreams(TaskOutput):
    first: Stream[Token]
    second: Stream[Token]


class ReturnsTwoStreams(Task[PromptInput, TwoTokenStreams]):
    def post_init(self) -> None:
        self.generate = Generate()

    def invoke(self, task_input: PromptInput) -> TwoTokenStreams:
        first = self.generate.invoke(GenerateInput(prompt="a"))
        return TwoTokenStreams(first=first, second=self.generate.invoke(GenerateInput(prompt="b")))


def test_a_graph_relays_one_stream() -> None:
    with pytest.raises(
        StaticGraphError,
        match=r"2 invocations stream their output \(Generate at position 0, Generate at position 1\), "
        r"but one graph relays one stream to the caller",
    ):
        ReturnsTwoStreams().trace(PromptInput(prompt="hi"))
