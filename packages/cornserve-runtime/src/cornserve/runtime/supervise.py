"""Keep a set of named children running: restart one that dies, a bounded number of times.

`cornserve up` runs the services of a local cluster this way: a service that crashes once (or is
killed) comes back without taking the cluster down, but one that keeps dying stops the cluster
with its log shown, instead of restarting forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol


class Supervised(Protocol):
    """A child the supervisor watches (e.g. `cornserve.cli.launcher.Child`)."""

    @property
    def name(self) -> str:
        """Unique among the supervised children; restarts are counted per name."""

    def exit_code(self) -> int | None:
        """None while it runs."""

    def log_tail(self) -> str:
        """The end of its log, shown when it dies."""


def supervise(
    children: Sequence[Supervised],
    restart: Callable[[str], object],
    should_stop: Callable[[], bool],
    max_restarts: int = 3,
    poll_s: float = 0.5,
    say: Callable[[str], object] = print,
) -> int:
    """Watch `children` until `should_stop()`; `restart(name)` one that dies, up to `max_restarts` each.

    Returns 0 when asked to stop, 1 when a child kept dying (its log tail is said first). Each death
    is said with the child's exit code and log tail, so an operator sees why it was restarted.
    """
    restarts: dict[str, int] = {}
    while not should_stop():
        dead = next((c for c in children if c.exit_code() is not None), None)
        if dead is not None:
            code, count = dead.exit_code(), restarts.get(dead.name, 0)
            if count >= max_restarts:
                say(
                    f"error: {dead.name} exited (code {code}) after {count} restart(s); giving up. "
                    f"Its log:\n{dead.log_tail()}"
                )
                return 1
            restarts[dead.name] = count + 1
            say(
                f"warning: {dead.name} exited unexpectedly (code {code}); restarting it "
                f"({count + 1} of {max_restarts}). Its log:\n{dead.log_tail()}"
            )
            restart(dead.name)
        time.sleep(poll_s)
    return 0
