"""Small unit and composite tasks for the task-abstraction tests.

Their executors do real array math in-process (numpy), exchanging data through a
LocalForwardStore the way real executors exchange it through the sidecar.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

import numpy as np

from cornserve.task import (
    DataForward,
    ExecutorRequest,
    InProcessRunner,
    LocalForwardStore,
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


class NumbersInput(TaskInput):
    values: list[float]


class TensorOutput(TaskOutput):
    tensor: DataForward[Tensor]


class ScaleInput(TaskInput):
    tensor: DataForward[Tensor]
    factor: float = 1.0


class SumInput(TaskInput):
    tensors: list[DataForward[Tensor]]


class SumOutput(TaskOutput):
    total: float


class GenerateInput(TaskInput):
    prompt: str
    tensor: DataForward[Tensor] | None = None
    count: int = 3


class Token(TaskOutput):
    index: int
    text: str


class MakeTensor(UnitTask[NumbersInput, TensorOutput]):
    default_descriptor = "MakeTensorDescriptor"
    label: str = "make"


class Scale(UnitTask[ScaleInput, TensorOutput]):
    default_descriptor = "ScaleDescriptor"


class Sum(UnitTask[SumInput, SumOutput]):
    default_descriptor = "SumDescriptor"


class Generate(UnitTask[GenerateInput, Stream[Token]]):
    default_descriptor = "GenerateDescriptor"

    def make_output_placeholder(self, task_input: GenerateInput) -> Stream[Token]:
        return Stream[Token].placeholder(self.display_name())


TaskT = TypeVar("TaskT", bound=UnitTask[Any, Any])


class JSONDescriptor(TaskExecutionDescriptor[TaskT], Generic[TaskT]):
    """Sends the input and the output forwards as JSON; outputs with forwards come back as recorded."""

    def to_request(self, task: TaskT, invocation: TaskInvocation) -> ExecutorRequest:
        body = {
            "task": task.model_dump(mode="json"),
            "input": invocation.task_input.model_dump(mode="json"),
            "outputs": [f.model_dump(mode="json") for f in iter_forwards(invocation.task_output)],
        }
        return ExecutorRequest(
            path=f"/{type(task).__name__.lower()}",
            body=body,
            stream=isinstance(invocation.task_output, Stream),
        )

    def from_response(self, task: TaskT, invocation: TaskInvocation, body: Any) -> TaskOutput:
        if list(iter_forwards(invocation.task_output)):
            return invocation.task_output
        return task.output_cls().model_validate(body)

    def from_stream_line(self, task: TaskT, invocation: TaskInvocation, line: str) -> Any:
        return Token.model_validate_json(line) if line.strip() else None


class MakeTensorDescriptor(JSONDescriptor[MakeTensor]):
    pass


class ScaleDescriptor(JSONDescriptor[Scale]):
    pass


class SumDescriptor(JSONDescriptor[Sum]):
    pass


class GenerateDescriptor(JSONDescriptor[Generate]):
    pass


# ----- composites ----------------------------------------------------------------------------------


class PipelineInput(TaskInput):
    values: list[float]
    factors: list[float]


class Pipeline(Task[PipelineInput, SumOutput]):
    """make → scale by each factor (fan-out) → sum of all scaled tensors (fan-in)."""

    def post_init(self) -> None:
        self.make = MakeTensor()
        self.scale = Scale()
        self.sum = Sum()

    def invoke(self, task_input: PipelineInput) -> SumOutput:
        made = self.make.invoke(NumbersInput(values=task_input.values))
        scaled = [
            self.scale.invoke(ScaleInput(tensor=made.tensor, factor=f)).tensor for f in task_input.factors
        ]
        return self.sum.invoke(SumInput(tensors=scaled))


class TwoPipelines(Task[PipelineInput, SumOutput]):
    """A composite of composites: two pipelines, then a sum of their tensors (depth 3)."""

    first: Pipeline
    second: Pipeline

    def invoke(self, task_input: PipelineInput) -> SumOutput:
        self.first.invoke(task_input)
        return self.second.invoke(task_input)


class Chat(Task[NumbersInput, Stream[Token]]):
    """make → generate (stream), with a transform of the stream items."""

    def post_init(self) -> None:
        self.make = MakeTensor(label="chat")
        self.generate = Generate()

    def invoke(self, task_input: NumbersInput) -> Stream[Token]:
        made = self.make.invoke(task_input)
        stream = self.generate.invoke(
            GenerateInput(prompt="p", tensor=made.tensor, count=len(task_input.values))
        )
        return stream.transform(lambda tok: tok.model_copy(update={"text": tok.text.upper()}))


# ----- in-process executors ------------------------------------------------------------------------


def make_executors(store: LocalForwardStore, log: list[str] | None = None) -> dict[Any, Any]:
    """Executors for the test tasks; each appends its path to `log` when called."""

    async def make(req: ExecutorRequest) -> Any:
        assert req.body is not None
        if log is not None:
            log.append(req.path)
        (out,) = req.body["outputs"]
        assert out["src_sidecar_ranks"] is not None, "forwards must be wired before execution"
        store.put(out["id"], np.asarray(req.body["input"]["values"], dtype=np.float64))
        return {"ok": True}

    async def scale(req: ExecutorRequest) -> Any:
        assert req.body is not None
        if log is not None:
            log.append(req.path)
        data = await store.get(req.body["input"]["tensor"]["id"], timeout=10)
        (out,) = req.body["outputs"]
        store.put(out["id"], data * req.body["input"]["factor"])
        return {"ok": True}

    async def total(req: ExecutorRequest) -> Any:
        assert req.body is not None
        if log is not None:
            log.append(req.path)
        arrays = [await store.get(t["id"], timeout=10) for t in req.body["input"]["tensors"]]
        return {"total": float(sum(a.sum() for a in arrays))}

    async def generate(req: ExecutorRequest) -> AsyncIterator[str]:
        assert req.body is not None
        if log is not None:
            log.append(req.path)
        body = req.body

        async def lines() -> AsyncIterator[str]:
            tensor = body["input"]["tensor"]
            base = float((await store.get(tensor["id"], timeout=10)).sum()) if tensor else 0.0
            for i in range(body["input"]["count"]):
                yield json.dumps({"index": i, "text": f"tok{i}:{base:g}"})

        return lines()

    return {MakeTensor: make, Scale: scale, Sum: total, Generate: generate}


def in_process(log: list[str] | None = None, **kwargs: Any) -> tuple[InProcessRunner, LocalForwardStore]:
    store = LocalForwardStore()
    return InProcessRunner(make_executors(store, log), **kwargs), store
