"""What a handler gets besides the invocation: the executor's task, identity and sidecar client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from cornserve.task.base import UnitTask
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskOutput

if TYPE_CHECKING:
    from cornserve.sidecar import Sidecar


class NoSidecarError(RuntimeError):
    """The executor was launched without sidecar ranks, so it cannot forward data."""


@dataclass
class ExecutorContext:
    """Shared by every invocation of one executor process.

    `sidecar` is the connected client of the executor's first sidecar rank: handlers `recv` their
    input forwards from it (then `mark_done`) and `send` their output forwards through it.
    """

    task: UnitTask[Any, Any]
    executor_id: str
    sidecar_ranks: list[int]
    _sidecar: Sidecar | None = field(default=None, repr=False)

    @property
    def sidecar(self) -> Sidecar:
        """The sidecar client; an error if this executor has no sidecar rank."""
        if self._sidecar is None:
            raise NoSidecarError(
                f"executor {self.executor_id} has no sidecar rank, so it cannot send or receive forwards"
            )
        return self._sidecar


HandlerResult: TypeAlias = TaskOutput | dict[str, Any] | AsyncIterator[Any]
Handler: TypeAlias = Callable[
    [ExecutorContext, TaskInvocation], Awaitable[HandlerResult] | AsyncIterator[Any]
]
"""`async def handler(ctx, invocation) -> output` or `async def handler(ctx, invocation): yield item`."""
