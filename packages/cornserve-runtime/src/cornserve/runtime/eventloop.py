"""Which asyncio event loop implementation every Cornserve process runs on.

Why uvloop for the control-plane services (gateway, dispatcher, resource manager, task manager):
their hot paths are chains of small socket reads and writes and task wake-ups, where the standard
selector loop's own Python code is a large share of each process's CPU; uvloop runs the same asyncio
API on libuv, in C (docs/performance.md, "Event loop"). Why not for executors and sidecar servers:
measured on uvloop, their sidecar transfers were slower (a 1 MiB same-node send 1.2-1.7x), so
``auto`` (the default) keeps the standard loop there. ``CORNSERVE_EVENT_LOOP=uvloop`` or ``asyncio``
forces one loop for a process (``asyncio`` also rules the loop out when chasing a bug); ``auto`` falls
back to the standard loop, saying so in the start-up log, where uvloop cannot be imported.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

logger = logging.getLogger(__name__)

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
"""auto: uvloop for control-plane services when installed, else the standard loop; uvloop: uvloop or
fail; asyncio: the standard loop."""

T = TypeVar("T")


class EventLoopUnavailable(RuntimeError):
    """``uvloop`` was asked for explicitly and cannot be imported here."""


def uvloop_installed() -> bool:
    """Whether uvloop can be imported in this environment."""
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(
    choice: EventLoopChoice, auto_uvloop: bool = True
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory `asyncio.Runner` gets for `choice` (None: the standard loop).

    ``auto`` means uvloop only where `auto_uvloop` says it measured faster (see the module).
    """
    if choice == "asyncio" or (choice == "auto" and not auto_uvloop):
        return None
    if not uvloop_installed():
        if choice == "uvloop":
            raise EventLoopUnavailable(
                "CORNSERVE_EVENT_LOOP=uvloop but uvloop is not installed here; install it, or set "
                "CORNSERVE_EVENT_LOOP=asyncio (or auto) for the standard event loop"
            )
        logger.info("uvloop is not installed: running on the standard asyncio event loop")
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which implementation `loop` is (the start-up log says it)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run_on_loop(choice: EventLoopChoice, main: Coroutine[Any, Any, T], auto_uvloop: bool = True) -> T:
    """`asyncio.run(main)` on the loop `choice` names; the first log line inside says which loop it is."""

    async def logged() -> T:
        logger.info("running on the %s event loop", loop_name(asyncio.get_running_loop()))
        return await main

    with asyncio.Runner(loop_factory=loop_factory(choice, auto_uvloop)) as runner:
        return runner.run(logged())
