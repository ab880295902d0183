"""The body of `await task(input)` and `task.trace(input)`: record, run, replay.

Recording and replay are `TaskContext`'s; running the recorded graph is the job of the current
`GraphRunner` (`cornserve.task.runner`). This module joins the two, so the task classes only need
to call `execute_task` / `trace_task`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cornserve.task.context import record_graph, replay_graph
from cornserve.task.graph import TaskGraph
from cornserve.task.io_models import TaskInput
from cornserve.task.runner import current_graph_runner
from cornserve.task.stream import Stream

if TYPE_CHECKING:
    from cornserve.task.base import Task


async def execute_task(task: Task[Any, Any], task_input: TaskInput) -> Any:
    """Record the graph, have the current graph runner execute it, and replay with the real outputs."""
    ctx, recorded = record_graph(task, task_input)
    if not ctx.invocations:
        return recorded
    outputs = await current_graph_runner().run_graph(ctx.invocations)
    try:
        return replay_graph(ctx, task_input, outputs)
    except BaseException:
        for out in outputs:
            if isinstance(out, Stream):
                await out.aclose()
        raise


def trace_task(task: Task[Any, Any], task_input: TaskInput) -> TaskGraph:
    """Record the graph of one call without executing it."""
    ctx, result = record_graph(task, task_input)
    return TaskGraph(invocations=ctx.invocations, output=result)
