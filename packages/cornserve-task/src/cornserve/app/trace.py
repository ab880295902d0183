"""Showing the task graphs an app makes for one request, without executing anything."""

from __future__ import annotations

import inspect
from typing import Any

from cornserve.app.loader import AppSpec
from cornserve.task.graph import TaskGraph
from cornserve.task.local import TracingRunner
from cornserve.task.runner import use_graph_runner
from cornserve.task.stream import Stream


async def trace_app(spec: AppSpec, request: dict[str, Any] | Any) -> list[TaskGraph]:
    """Run the app's `serve` on `request` with a graph runner that only records, and return its graphs.

    Streams come back empty, so `serve` runs to completion; a `serve` that reads non-forwarded task
    outputs sees placeholders and fails with UnmaterializedDataError.
    """
    req = request if isinstance(request, spec.request_model) else spec.request_model.model_validate(request)
    tracer = TracingRunner()
    with use_graph_runner(tracer):
        result = spec.serve(req)
        if inspect.isasyncgen(result) or hasattr(result, "__anext__"):
            async for _ in result:
                pass
        else:
            awaited = await result
            if hasattr(awaited, "__anext__"):
                async for _ in awaited:
                    pass
    # At most one invocation of a graph streams, and that stream is what the graph returns.
    return [
        TaskGraph(
            invocations=graph,
            output=next((inv.task_output for inv in graph if isinstance(inv.task_output, Stream)), None),
        )
        for graph in tracer.graphs
    ]
