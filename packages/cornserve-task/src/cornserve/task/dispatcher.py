"""Where recorded graphs go: the dispatcher interface and how one is configured.

The app driver, a notebook client and tests each plug in their own dispatcher; `await task(...)`
uses the innermost one set with `use_dispatcher`, else the process-wide one from `set_dispatcher`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

from cornserve.task.base import TaskOutput
from cornserve.task.context import TaskInvocation
from cornserve.task.errors import NoDispatcherError


@runtime_checkable
class Dispatcher(Protocol):
    """Executes a recorded graph and returns one real output per invocation, in order.

    A failure of any invocation must fail the whole call promptly (raise), and the call must not
    wait without a deadline. Only the last invocation's output may be a `Stream`.
    """

    async def dispatch(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        """Execute `invocations` and return their outputs."""
        ...


_process_dispatcher: Dispatcher | None = None
_scoped_dispatcher: ContextVar[Dispatcher | None] = ContextVar("cornserve_dispatcher", default=None)


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Set (or clear, with None) the process-wide dispatcher."""
    global _process_dispatcher
    _process_dispatcher = dispatcher


@contextmanager
def use_dispatcher(dispatcher: Dispatcher) -> Iterator[Dispatcher]:
    """Use `dispatcher` for task calls made in this context (and asyncio tasks started from it)."""
    token = _scoped_dispatcher.set(dispatcher)
    try:
        yield dispatcher
    finally:
        _scoped_dispatcher.reset(token)


def get_dispatcher() -> Dispatcher:
    """The dispatcher `await task(...)` will use now."""
    dispatcher = _scoped_dispatcher.get() or _process_dispatcher
    if dispatcher is None:
        raise NoDispatcherError(
            "no dispatcher is configured, so the task graph cannot be executed. Apps get one from the "
            "Cornserve gateway; notebooks get one from cornserve.client; tests can use "
            "cornserve.task.InProcessDispatcher with use_dispatcher()/set_dispatcher(). "
            "To only look at the graph, use task.trace(input)"
        )
    return dispatcher
