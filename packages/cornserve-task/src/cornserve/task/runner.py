"""The hook through which `await task(...)` has a recorded graph executed: the `GraphRunner`.

`cornserve.task` records graphs but never executes them itself; whoever hosts the app plugs in a
graph runner (as Temporal's `workflow` module is a front over a runtime that the worker sets): the
gateway's app driver installs its client of the Task Dispatcher service, a notebook session
installs itself, tests install an `InProcessRunner`. `await task(...)` uses the innermost runner
set with `use_graph_runner`, else the process-wide one from `set_graph_runner`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

from cornserve.task.errors import NoGraphRunnerError
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskOutput


@runtime_checkable
class GraphRunner(Protocol):
    """Executes a recorded graph and returns one real output per invocation, in order.

    A failure of any invocation must fail the whole call promptly (raise), and the call must not
    wait without a deadline. At most one invocation's output is a `Stream` (the graph's result,
    at any position); stream forwards (`DataForward[Stream[T]]`) travel between executors and
    never reach the runner's caller.
    """

    async def run_graph(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        """Execute `invocations` and return their outputs."""
        ...


_process_runner: GraphRunner | None = None
_scoped_runner: ContextVar[GraphRunner | None] = ContextVar("cornserve_graph_runner", default=None)


def set_graph_runner(runner: GraphRunner | None) -> None:
    """Set (or clear, with None) the process-wide graph runner."""
    global _process_runner
    _process_runner = runner


@contextmanager
def use_graph_runner(runner: GraphRunner) -> Iterator[GraphRunner]:
    """Use `runner` for task calls made in this context (and asyncio tasks started from it)."""
    token = _scoped_runner.set(runner)
    try:
        yield runner
    finally:
        _scoped_runner.reset(token)


def current_graph_runner() -> GraphRunner:
    """The graph runner `await task(...)` will use now."""
    runner = _scoped_runner.get() or _process_runner
    if runner is None:
        raise NoGraphRunnerError(
            "no graph runner is configured, so the task graph cannot be executed. Apps get one from the "
            "Cornserve gateway; notebooks get one from cornserve.client; tests can use "
            "cornserve.task.InProcessRunner with use_graph_runner()/set_graph_runner(). "
            "To only look at the graph, use task.trace(input)"
        )
    return runner
