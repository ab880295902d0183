"""Test task library for the dispatcher tests, uploaded as source (never imported as a module).

Descriptors send the invocation as JSON (input plus the output forwards, ranks wired); the
test's stand-in executors do the math and exchange data through an in-test forward store.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from cornserve.task import (
    DataForward,
    ExecutorRequest,
    Stream,
    Task,
    TaskExecutionDescriptor,
    TaskInput,
    TaskInvocation,
    TaskOutput,
    Tensor,
    UnitTask,
)
from cornserve.task.forward import iter_forwards


class EchoIn(TaskInput):
    text: str
    delay_s: float = 0.0
    hold: bool = False
    fail: str | None = None


class EchoOut(TaskOutput):
    text: str
    executor: str


class Values(TaskInput):
    values: list[float]
    fail: str | None = None


class TensorOut(TaskOutput):
    tensor: DataForward[Tensor]


class ScaleIn(TaskInput):
    tensor: DataForward[Tensor]
    factor: float = 1.0


class SumIn(TaskInput):
    tensors: list[DataForward[Tensor]]


class SumOut(TaskOutput):
    total: float


class GenIn(TaskInput):
    prompt: str
    count: int = 3
    tensor: DataForward[Tensor] | None = None
    bad_line_at: int | None = None
    stall_at: int | None = None
    fail: str | None = None


class Token(TaskOutput):
    index: int
    text: str


class Echo(UnitTask[EchoIn, EchoOut]):
    default_descriptor = "EchoDescriptor"
    label: str = "echo"


class Produce(UnitTask[Values, TensorOut]):
    default_descriptor = "ProduceDescriptor"


class Scale(UnitTask[ScaleIn, TensorOut]):
    default_descriptor = "ScaleDescriptor"


class Sum(UnitTask[SumIn, SumOut]):
    default_descriptor = "SumDescriptor"


class Generate(UnitTask[GenIn, Stream[Token]]):
    default_descriptor = "GenerateDescriptor"

    def make_output_placeholder(self, task_input: GenIn) -> Stream[Token]:
        return Stream[Token].placeholder(self.display_name())


class ThinkIn(TaskInput):
    count: int = 3
    hold_after_first: bool = False
    fail_at: int | None = None


class HiddenOut(TaskOutput):
    hidden: DataForward[Stream[Tensor]]


class SpeakIn(TaskInput):
    hidden: DataForward[Stream[Tensor]]


class Think(UnitTask[ThinkIn, HiddenOut]):
    """Produces a stream forward (one item per step), consumed by Speak."""

    default_descriptor = "ThinkDescriptor"


class Speak(UnitTask[SpeakIn, Stream[Token]]):
    """Streams one token per item of the stream forward it consumes."""

    default_descriptor = "SpeakDescriptor"

    def make_output_placeholder(self, task_input: SpeakIn) -> Stream[Token]:
        return Stream[Token].placeholder(self.display_name())


TaskT = TypeVar("TaskT", bound=UnitTask[Any, Any])


class JSONDescriptor(TaskExecutionDescriptor[TaskT], Generic[TaskT]):
    """POST /<task class> with the input and the output forwards; outputs with forwards come back as recorded."""

    def to_request(self, task: TaskT, invocation: TaskInvocation) -> ExecutorRequest:
        return ExecutorRequest(
            path=f"/{type(task).__name__.lower()}",
            body={
                "input": invocation.task_input.model_dump(mode="json"),
                "outputs": [f.model_dump(mode="json") for f in iter_forwards(invocation.task_output)],
            },
            stream=isinstance(invocation.task_output, Stream),
        )

    def from_response(self, task: TaskT, invocation: TaskInvocation, body: Any) -> TaskOutput:
        if list(iter_forwards(invocation.task_output)):
            return invocation.task_output
        return task.output_cls().model_validate(body)

    def from_stream_line(self, task: TaskT, invocation: TaskInvocation, line: str) -> Any:
        if not line.strip():
            return None
        if line == "BAD":
            raise ValueError("the executor sent a line that is not a token")
        return Token.model_validate_json(line)


class EchoDescriptor(JSONDescriptor[Echo]):
    pass


class ProduceDescriptor(JSONDescriptor[Produce]):
    pass


class ScaleDescriptor(JSONDescriptor[Scale]):
    pass


class SumDescriptor(JSONDescriptor[Sum]):
    pass


class GenerateDescriptor(JSONDescriptor[Generate]):
    pass


class ThinkDescriptor(JSONDescriptor[Think]):
    pass


class SpeakDescriptor(JSONDescriptor[Speak]):
    pass


# ----- composites (not registered; only the test process uses them) -------------------------------


class PipelineIn(TaskInput):
    values: list[float]
    factor: float = 2.0
    fail: str | None = None


class Pipeline(Task[PipelineIn, SumOut]):
    """produce → scale; sum(produced, scaled): 3 invocations, one forward broadcast to two consumers."""

    def post_init(self) -> None:
        self.produce = Produce()
        self.scale = Scale()
        self.sum = Sum()

    def invoke(self, task_input: PipelineIn) -> SumOut:
        made = self.produce.invoke(Values(values=task_input.values, fail=task_input.fail))
        scaled = self.scale.invoke(ScaleIn(tensor=made.tensor, factor=task_input.factor))
        return self.sum.invoke(SumIn(tensors=[made.tensor, scaled.tensor]))


class ChatIn(TaskInput):
    values: list[float]
    bad_line_at: int | None = None
    stall_at: int | None = None
    fail: str | None = None


class Chat(Task[ChatIn, Stream[Token]]):
    """produce → generate (stream), with a transform of the items."""

    def post_init(self) -> None:
        self.produce = Produce()
        self.generate = Generate()

    def invoke(self, task_input: ChatIn) -> Stream[Token]:
        made = self.produce.invoke(Values(values=task_input.values))
        stream = self.generate.invoke(
            GenIn(
                prompt="p",
                tensor=made.tensor,
                count=len(task_input.values),
                bad_line_at=task_input.bad_line_at,
                stall_at=task_input.stall_at,
                fail=task_input.fail,
            )
        )
        return stream.transform(lambda tok: tok.model_copy(update={"text": tok.text.upper()}))


class ThinkThenSpeak(Task[ThinkIn, Stream[Token]]):
    """think ⇢ speak: a stream forward between them; speak's stream is the result."""

    def post_init(self) -> None:
        self.think = Think()
        self.speak = Speak()

    def invoke(self, task_input: ThinkIn) -> Stream[Token]:
        hidden = self.think.invoke(task_input).hidden
        return self.speak.invoke(SpeakIn(hidden=hidden))
