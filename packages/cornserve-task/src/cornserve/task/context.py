"""Recording a task graph, and replaying `invoke` with the real outputs.

`await task(x)` runs `task.invoke(x)` twice. The first run records: every unit task call appends a
`TaskInvocation` (task, input, output placeholder) to a fresh `TaskContext`. The graph runner executes
the recorded list. The second run replays: each unit task call takes its real output, and must be
exactly the call recorded at that position (the static-graph rule). Both runs are synchronous and
the context lives in a ContextVar, so concurrent `await task(...)` calls never share one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from cornserve.task.errors import (
    StaticGraphError,
    TaskContextError,
    TaskDefinitionError,
    TaskExecutionError,
    UnmaterializedDataError,
)
from cornserve.task.forward import DataForward, Unmaterialized, iter_forwards
from cornserve.task.generics import generic_origin
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskInput, TaskOutput
from cornserve.task.nested import nested_values
from cornserve.task.stream import Stream, is_stream_forward

if TYPE_CHECKING:
    from cornserve.task.base import Task, UnitTask


def _canonical(value: Any) -> Any:
    """A comparable form of an input in which forwards compare by id only (ranks get wired later)."""
    if isinstance(value, DataForward):
        return ("forward", value.id)
    if isinstance(value, Unmaterialized):
        return ("unmaterialized", id(value))
    if isinstance(value, BaseModel):
        return (
            type(value).__qualname__,
            tuple((n, _canonical(value.__dict__.get(n))) for n in type(value).model_fields),
        )
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted(((k, _canonical(v)) for k, v in value.items()), key=lambda kv: repr(kv[0])))
    return value


def conforms(value: Any, cls: type) -> bool:
    """isinstance() that treats `Stream[X]` (a pydantic parametrization) as `Stream`."""
    return isinstance(value, generic_origin(cls))


class TaskContext:
    """The per-call record of one graph: its invocations, then (during replay) their real outputs."""

    def __init__(self, root: Task[Any, Any]) -> None:
        self.root = root
        self.invocations: list[TaskInvocation] = []
        self._mode: Literal["record", "replay"] = "record"
        self._outputs: Sequence[TaskOutput] = ()
        self._cursor = 0

    def unit_invoke(self, task: UnitTask[Any, Any], task_input: Any) -> TaskOutput:
        """Called by every UnitTask.invoke: record the call, or hand back its real output."""
        input_cls = task.input_cls()
        if not isinstance(task_input, input_cls):
            raise TypeError(
                f"{task.display_name()}.invoke() takes a {input_cls.__name__}, not {type(task_input).__name__}"
            )
        if self._mode == "record":
            return self._record(task, task_input)
        return self._replay(task, task_input)

    def _record(self, task: UnitTask[Any, Any], task_input: TaskInput) -> TaskOutput:
        position = len(self.invocations)
        for leaf in nested_values(task_input, opaque=(DataForward, Stream)):
            if isinstance(leaf, Unmaterialized):
                raise UnmaterializedDataError(
                    f"{leaf!r} was passed into the input of {task.display_name()} at position {position}; "
                    "only DataForwards may carry one task's output into another task's input"
                )
            if isinstance(leaf, Stream):
                raise StaticGraphError(
                    f"{task.display_name()} at position {position} takes the Stream produced by "
                    f"{leaf.handle.producer} in its input; a Stream output is relayed to the caller only. "
                    "To stream data from one task into another, give the producer a DataForward[Stream[T]] "
                    "output and pass that forward to the consumer"
                )
        task.validate_input(task_input)
        output: TaskOutput = task.make_output_placeholder(task_input)
        if not conforms(output, task.output_cls()):
            raise TaskDefinitionError(
                f"{type(task).__name__}.make_output_placeholder() returned {type(output).__name__}, "
                f"not {task.output_cls().__name__}"
            )
        if isinstance(output, Stream) and output.is_placeholder:
            output.handle.producer = f"{task.display_name()} at position {position}"
            output.handle.position = position
        self.invocations.append(TaskInvocation(task=task, task_input=task_input, task_output=output))
        return output

    def _replay(self, task: UnitTask[Any, Any], task_input: TaskInput) -> TaskOutput:
        position = self._cursor
        total = len(self.invocations)
        if position >= total:
            raise StaticGraphError(
                f"replay of {self.root.display_name()} made an extra invocation: {task.display_name()} at "
                f"position {position}, but only {total} invocations were recorded. invoke() must make the "
                "same task calls for the same request"
            )
        recorded = self.invocations[position]
        if recorded.task is not task and recorded.task.deployment_key != task.deployment_key:
            now, then = task.display_name(), recorded.task.display_name()
            if now == then:
                now, then = f"{now} ({task.deployment_key})", f"{then} ({recorded.task.deployment_key})"
            raise StaticGraphError(
                f"replay of {self.root.display_name()} invoked {now} at position {position}, but the recording "
                f"invoked {then} there. invoke() must make the same task calls in the same order for the same request"
            )
        if _canonical(recorded.task_input) != _canonical(task_input):
            raise StaticGraphError(
                f"replay of {self.root.display_name()} invoked {task.display_name()} at position {position} "
                "with a different input than was recorded. Task inputs must depend only on the request and "
                "on DataForwards, never on materialized outputs"
            )
        self._cursor += 1
        output: TaskOutput = self._outputs[position]
        return output

    # ----- phases ----------------------------------------------------------------------------------

    def check_recorded(self, result: Any) -> None:
        """Enforce the static-graph rules that concern the recorded graph as a whole."""
        if not conforms(result, self.root.output_cls()):
            raise TaskDefinitionError(
                f"{self.root.display_name()}.invoke() returned {type(result).__name__}, "
                f"not its declared output {self.root.output_cls().__name__}"
            )
        result_streams = {
            leaf.handle.position
            for leaf in nested_values(result, opaque=(DataForward, Stream))
            if isinstance(leaf, Stream)
        }
        streaming = [i for i, inv in enumerate(self.invocations) if isinstance(inv.task_output, Stream)]
        producers: dict[str, int] = {}
        consumers: dict[str, list[int]] = {}
        for position, inv in enumerate(self.invocations):
            name = inv.task.display_name()
            if isinstance(inv.task_output, Stream) and position not in result_streams:
                raise StaticGraphError(
                    f"{name} at position {position} produces a Stream that is not the graph's result; "
                    "a Stream output is relayed to the caller, so it must be what the graph returns. To "
                    "stream data into another task, give the producer a DataForward[Stream[T]] output"
                )
            for fwd in iter_forwards(inv.task_input):
                if fwd.id not in producers:
                    raise StaticGraphError(
                        f"{name} at position {position} consumes DataForward {fwd.id}, which no earlier task in "
                        "this graph produced. Forwarded data only travels within one `await task(...)` call: "
                        "compose the producer and the consumer in one composite task"
                    )
                seen = consumers.setdefault(fwd.id, [])
                if position not in seen:
                    seen.append(position)
            for fwd in iter_forwards(inv.task_output):
                producers[fwd.id] = position
        if len(streaming) > 1:
            names = ", ".join(f"{self.invocations[i].task.display_name()} at position {i}" for i in streaming)
            raise StaticGraphError(
                f"{len(streaming)} invocations stream their output ({names}), but one graph relays one "
                "stream to the caller; make the others answer with a value (e.g. LLMCompletionTask) or "
                "call them in separate `await`s"
            )
        returned = {fwd.id for fwd in iter_forwards(result)}
        for fid, position in producers.items():
            inv = self.invocations[position]
            fwd = next(f for f in iter_forwards(inv.task_output) if f.id == fid)
            where = f"DataForward {fid} ({fwd.data_type}) produced by {inv.task.display_name()} at position {position}"
            readers = consumers.get(fid, [])
            if is_stream_forward(fwd):
                if not readers:
                    what = "returned but consumed by no task" if fid in returned else "consumed by no task"
                    raise StaticGraphError(
                        f"{where} is a stream {what}; a stream forward travels chunk by chunk to exactly "
                        "one consuming task of the same graph"
                    )
                if len(readers) > 1:
                    names = ", ".join(
                        f"{self.invocations[r].task.display_name()} at position {r}" for r in readers
                    )
                    raise StaticGraphError(
                        f"{where} is a stream consumed by {len(readers)} tasks ({names}); a stream forward "
                        "has exactly one consumer (produce one stream forward per consumer)"
                    )
                continue
            if not readers and fid not in returned:
                raise StaticGraphError(
                    f"{where} is neither consumed by another task nor returned; every forwarded value "
                    "needs a destination"
                )

    def begin_replay(self, outputs: Sequence[TaskOutput]) -> None:
        """Switch to replay with the graph runner's outputs, one per recorded invocation."""
        if len(outputs) != len(self.invocations):
            raise TaskExecutionError(
                f"the graph runner returned {len(outputs)} outputs for {len(self.invocations)} invocations"
            )
        for position, (inv, out) in enumerate(zip(self.invocations, outputs, strict=True)):
            if not conforms(out, inv.task.output_cls()):
                raise TaskExecutionError(
                    f"the graph runner returned {type(out).__name__} for {inv.task.display_name()} at position "
                    f"{position}, expected {inv.task.output_cls().__name__}",
                    task_name=inv.task.display_name(),
                    position=position,
                )
        self._mode = "replay"
        self._outputs = outputs
        self._cursor = 0

    def end_replay(self) -> None:
        """Check that replay made every recorded invocation."""
        if self._cursor != len(self.invocations):
            missing = self.invocations[self._cursor]
            raise StaticGraphError(
                f"replay of {self.root.display_name()} made {self._cursor} of {len(self.invocations)} recorded "
                f"invocations; {missing.task.display_name()} at position {self._cursor} was not invoked again. "
                "invoke() must make the same task calls for the same request"
            )


_active_context: ContextVar[TaskContext | None] = ContextVar("cornserve_task_context", default=None)


def current_context(task: UnitTask[Any, Any]) -> TaskContext:
    """The context of the graph being recorded or replayed; an error outside of one."""
    ctx = _active_context.get()
    if ctx is None:
        raise TaskContextError(
            f"{task.display_name()}.invoke() was called outside of a task call. Call `await task(input)` "
            "(or `task.trace(input)`) on the outermost task; inside a composite's invoke(), call subtasks' "
            "invoke() directly"
        )
    return ctx


def _run_invoke(ctx: TaskContext, task: Task[Any, Any], task_input: TaskInput) -> Any:
    token = _active_context.set(ctx)
    try:
        return task.invoke(task_input)
    finally:
        _active_context.reset(token)


def record_graph(task: Task[Any, Any], task_input: TaskInput) -> tuple[TaskContext, Any]:
    """Run `invoke` once in record mode and check the static-graph rules."""
    if _active_context.get() is not None:
        raise TaskContextError(
            f"`await {task.display_name()}(...)` was called inside another task's invoke(); invoke() is "
            "synchronous and composes subtasks by calling their invoke()"
        )
    ctx = TaskContext(task)
    result = _run_invoke(ctx, task, task_input)
    ctx.check_recorded(result)
    return ctx, result


def replay_graph(ctx: TaskContext, task_input: TaskInput, outputs: Sequence[TaskOutput]) -> Any:
    """Run `invoke` again, handing each unit task its real output."""
    ctx.begin_replay(outputs)
    result = _run_invoke(ctx, ctx.root, task_input)
    ctx.end_replay()
    return result
