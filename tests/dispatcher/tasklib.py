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


class DEchoIn(TaskInput):
    text: str
    delay_s: float = 0.0
    hold: bool = False
    fail: str | None = None


class DEchoOut(TaskOutput):
    text: str
    executor: str


class DValues(TaskInput):
    values: list[float]
    fail: str | None = None


class DTensor(TaskOutput):
    tensor: DataForward[Tensor]


class DScaleIn(TaskInput):
    tensor: DataForward[Tensor]
    factor: float = 1.0


class DSumIn(TaskInput):
    tensors: list[DataForward[Tensor]]


class DSumOut(TaskOutput):
    total: float


class DGenIn(TaskInput):
    prompt: str
    count: int = 3
    tensor: DataForward[Tensor] | None = None
    bad_line_at: int | None = None
    stall_at: int | None = None
    fail: str | None = None


class DToken(TaskOutput):
    index: int
    text: str


class DEcho(UnitTask[DEchoIn, DEchoOut]):
    default_descriptor = "DEchoDescriptor"
    label: str = "echo"


class DProduce(UnitTask[DValues, DTensor]):
    default_descriptor = "DProduceDescriptor"


class DScale(UnitTask[DScaleIn, DTensor]):
    default_descriptor = "DScaleDescriptor"


class DSum(UnitTask[DSumIn, DSumOut]):
    default_descriptor = "DSumDescriptor"


class DGenerate(UnitTask[DGenIn, Stream[DToken]]):
    default_descriptor = "DGenerateDescriptor"

    def make_output_placeholder(self, task_input: DGenIn) -> Stream[DToken]:
        return Stream[DToken].placeholder(self.display_name())


TaskT = TypeVar("TaskT", bound=UnitTask[Any, Any])


class DJSONDescriptor(TaskExecutionDescriptor[TaskT], Generic[TaskT]):
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
        return DToken.model_validate_json(line)


class DEchoDescriptor(DJSONDescriptor[DEcho]):
    pass


class DProduceDescriptor(DJSONDescriptor[DProduce]):
    pass


class DScaleDescriptor(DJSONDescriptor[DScale]):
    pass


class DSumDescriptor(DJSONDescriptor[DSum]):
    pass


class DGenerateDescriptor(DJSONDescriptor[DGenerate]):
    pass


# ----- composites (not registered; only the test process uses them) -------------------------------


class DPipelineIn(TaskInput):
    values: list[float]
    factor: float = 2.0
    fail: str | None = None


class DPipeline(Task[DPipelineIn, DSumOut]):
    """produce → scale; sum(produced, scaled): 3 invocations, one forward broadcast to two consumers."""

    def post_init(self) -> None:
        self.produce = DProduce()
        self.scale = DScale()
        self.sum = DSum()

    def invoke(self, task_input: DPipelineIn) -> DSumOut:
        made = self.produce.invoke(DValues(values=task_input.values, fail=task_input.fail))
        scaled = self.scale.invoke(DScaleIn(tensor=made.tensor, factor=task_input.factor))
        return self.sum.invoke(DSumIn(tensors=[made.tensor, scaled.tensor]))


class DChatIn(TaskInput):
    values: list[float]
    bad_line_at: int | None = None
    stall_at: int | None = None
    fail: str | None = None


class DChat(Task[DChatIn, Stream[DToken]]):
    """produce → generate (stream), with a transform of the items."""

    def post_init(self) -> None:
        self.produce = DProduce()
        self.generate = DGenerate()

    def invoke(self, task_input: DChatIn) -> Stream[DToken]:
        made = self.produce.invoke(DValues(values=task_input.values))
        stream = self.generate.invoke(
            DGenIn(
                prompt="p",
                tensor=made.tensor,
                count=len(task_input.values),
                bad_line_at=task_input.bad_line_at,
                stall_at=task_input.stall_at,
                fail=task_input.fail,
            )
        )
        return stream.transform(lambda tok: tok.model_copy(update={"text": tok.text.upper()}))
