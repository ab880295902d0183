"""Showing the task graphs an app makes for one request, without executing anything."""

from __future__ import annotations

import inspect
from typing import Any

from cornserve.app.loader import AppSpec
from cornserve.task.errors import TracedOutputError
from cornserve.task.graph import TaskGraph
from cornserve.task.local import TracingRunner
from cornserve.task.runner import use_graph_runner
from cornserve.task.stream import Stream


async def trace_app(spec: AppSpec, request: dict[str, Any] | Any) -> list[TaskGraph]:
    """Run the app's `serve` on `request` with a graph runner that only records, and return its graphs.

    Streams come back empty, so `serve` runs to completion. A `serve` that uses a value output of a
    graph (e.g. the text of a completion, to build its next graph) cannot go on without executing
    anything: tracing stops there (`TracedOutputError`), and the last graph's `note` says so. Any
    other error (a static-graph rule broken while recording, an invalid request) is raised.
    """
    req = request if isinstance(request, spec.request_model) else spec.request_model.model_validate(request)
    tracer = TracingRunner()
    stopped = ""
    with use_graph_runner(tracer):
        try:
            await _run_serve(spec, req)
        except TracedOutputError as exc:
            if not tracer.graphs:
                raise
            stopped = f"tracing stopped after this graph: {exc}"
    # At most one invocation of a graph streams, and that stream is what the graph returns.
    graphs = [
        TaskGraph(
            invocations=graph,
            output=next((inv.task_output for inv in graph if isinstance(inv.task_output, Stream)), None),
        )
        for graph in tracer.graphs
    ]
    if graphs and stopped:
        graphs[-1].note = stopped
    return graphs


async def _run_serve(spec: AppSpec, req: Any) -> None:
    """Call `serve` and exhaust what it returns or yields."""
    result = spec.serve(req)
    if inspect.isasyncgen(result) or hasattr(result, "__anext__"):
        async for _ in result:
            pass
    else:
        awaited = await result
        if hasattr(awaited, "__anext__"):
            async for _ in awaited:
                pass
