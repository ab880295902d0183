"""An in-process graph runner: executes graphs against executor functions in the same process.

It follows the Task Dispatcher service's steps — the invocations cross a JSON round trip, forwards are
wired to sidecar ranks, every executor request is built by the task's descriptor and its response
parsed by it — but executors are async functions and forwarded data lives in a `LocalForwardStore`.
It serves tests and offline experiments; the cluster uses the Task Dispatcher service instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter

from cornserve.task.base import UnitTask
from cornserve.task.descriptor import ExecutorRequest
from cornserve.task.errors import TaskExecutionError, TracedOutputError, UnmaterializedDataError
from cornserve.task.forward import Unmaterialized
from cornserve.task.graph import wire_forwards
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskOutput
from cornserve.task.stream import Stream

InProcessExecutor = Callable[[ExecutorRequest], Awaitable[Any]]
"""Takes a request; returns the JSON body, or (for `request.stream`) an async iterator of lines."""

_INVOCATIONS = TypeAdapter(list[TaskInvocation])


class LocalForwardStore:
    """Forwarded data by forward id, for in-process executors (the sidecar's job in a cluster)."""

    def __init__(self) -> None:
        self._slots: dict[str, asyncio.Future[Any]] = {}

    def _slot(self, forward_id: str) -> asyncio.Future[Any]:
        if forward_id not in self._slots:
            self._slots[forward_id] = asyncio.get_running_loop().create_future()
        return self._slots[forward_id]

    def put(self, forward_id: str, data: Any) -> None:
        """Store the data of one forward; consumers waiting for it wake up."""
        slot = self._slot(forward_id)
        if slot.done():
            raise ValueError(f"forward {forward_id} was already sent")
        slot.set_result(data)

    async def get(self, forward_id: str, timeout: float = 30.0) -> Any:
        """Wait (at most `timeout` seconds) for the data of one forward."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._slot(forward_id)), timeout)
        except TimeoutError:
            raise TimeoutError(f"forward {forward_id} was not sent within {timeout} s") from None

    def pop(self, forward_id: str) -> None:
        """Free one forward's data."""
        self._slots.pop(forward_id, None)

    def __len__(self) -> int:
        return len(self._slots)


class InProcessRunner:
    """Executes graphs by calling `executors[task class or deployment key](request)` concurrently."""

    def __init__(
        self,
        executors: Mapping[type[UnitTask[Any, Any]] | str, InProcessExecutor],
        *,
        timeout: float = 60.0,
    ) -> None:
        self._executors = dict(executors)
        self._ranks: dict[str, int] = {}
        self.timeout = timeout
        self.graphs_run = 0

    def _resolve(self, task: UnitTask[Any, Any]) -> tuple[InProcessExecutor, list[int]]:
        executor = self._executors.get(task.deployment_key)
        if executor is None:
            executor = next((self._executors[c] for c in type(task).__mro__ if c in self._executors), None)
        if executor is None:
            raise TaskExecutionError(
                f"no in-process executor for {task.display_name()} (key {task.deployment_key})",
                task_name=task.display_name(),
            )
        rank = self._ranks.setdefault(task.deployment_key, len(self._ranks))
        return executor, [rank]

    async def run_graph(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        """Execute one graph; any failure cancels the rest and raises TaskExecutionError."""
        wire = _INVOCATIONS.validate_json(_INVOCATIONS.dump_json(list(invocations)))
        resolved = [self._resolve(inv.task) for inv in wire]
        wire_forwards(wire, [ranks for _, ranks in resolved])
        self.graphs_run += 1

        async def run(position: int) -> TaskOutput:
            inv = wire[position]
            descriptor = inv.task.descriptor
            name = inv.task.display_name()
            try:
                request = descriptor.to_request(inv.task, inv)
                body = await resolved[position][0](request)
                if request.stream:
                    return Stream.from_iterator(_parse_stream(descriptor, inv, body, name, position))
                return descriptor.from_response(inv.task, inv, body)
            except TaskExecutionError:
                raise
            except Exception as exc:
                raise TaskExecutionError(
                    f"{name} at position {position} failed: {exc}", task_name=name, position=position
                ) from exc

        try:
            async with asyncio.timeout(self.timeout), asyncio.TaskGroup() as group:
                tasks = [group.create_task(run(i)) for i in range(len(wire))]
        except* TaskExecutionError as failed:
            raise failed.exceptions[0] from None
        except* TimeoutError:
            raise TaskExecutionError(f"the graph did not finish within {self.timeout} s") from None
        return [t.result() for t in tasks]


async def _parse_stream(
    descriptor: Any, inv: TaskInvocation, lines: AsyncIterator[str], name: str, position: int
) -> AsyncIterator[Any]:
    try:
        async for line in lines:
            item = descriptor.from_stream_line(inv.task, inv, line)
            if item is not None:
                yield item
    except Exception as exc:
        raise TaskExecutionError(
            f"{name} at position {position} failed while streaming: {exc}", task_name=name, position=position
        ) from exc


class TracedOutput(Unmaterialized):
    """A value output of a traced graph: using it raises `TracedOutputError` (tracing ends there)."""

    __slots__ = ()

    def _error(self) -> UnmaterializedDataError:
        return TracedOutputError(
            f"serve() used output field {self._field!r} of {self._task_name}, which only exists when the "
            "graph really runs; tracing executes nothing, so it stops here"
        )


class TracingRunner:
    """Executes nothing: keeps each graph it is given and returns the recorded placeholders.

    Streams come back empty; value outputs are the task's `traced_output` stand-in if it has one,
    else their value fields are `TracedOutput`s. Used to show the graphs an app's `serve` makes
    for a request.
    """

    def __init__(self) -> None:
        self.graphs: list[list[TaskInvocation]] = []

    async def run_graph(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        """Record the graph; return its placeholders."""
        self.graphs.append(list(invocations))
        outputs: list[TaskOutput] = []
        for inv in invocations:
            out = inv.task_output
            if isinstance(out, Stream):
                outputs.append(Stream.from_iterator(_empty()))
                continue
            stand_in = inv.task.traced_output(inv.task_input)
            if stand_in is not None:
                outputs.append(stand_in)
                continue
            fields: dict[str, Any] = {
                name: TracedOutput(inv.task.display_name(), name)
                if isinstance(value, Unmaterialized)
                else value
                for name, value in ((n, out.__dict__.get(n)) for n in type(out).model_fields)
            }
            outputs.append(type(out).model_construct(**fields))
        return outputs


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover
