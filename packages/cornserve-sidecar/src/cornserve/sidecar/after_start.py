"""A value the server gets only when it starts (its NATS connection, its arena).

Parts of the server are built before start; they hold one of these and read it when serving,
which can only happen after start. Reading it earlier is a bug, reported by name.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class AfterStart(Generic[T]):
    """Holds ``what`` once :meth:`set` was called at start."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._value: T | None = None

    def set(self, value: T) -> None:
        """Provide the value (at start)."""
        self._value = value

    @property
    def ready(self) -> bool:
        """Whether the value was provided."""
        return self._value is not None

    def get(self) -> T:
        """The value; raises if the server has not started."""
        if self._value is None:
            raise RuntimeError(f"the sidecar server's {self._what} exists only after it started")
        return self._value
