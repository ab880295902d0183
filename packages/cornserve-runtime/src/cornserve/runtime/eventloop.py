"""The event loop every process runs on: uvloop's (a dependency of this package), or asyncio's.

`CORNSERVE_EVENT_LOOP` = `uvloop` (default) or `asyncio`. uvloop's loop and transports are written
in C over libuv: measured on the dispatch benchmark (docs/performance.md) they cut the CPU each
request costs the gateway, dispatcher, executors, sidecars and task managers by about a quarter.
Where uvloop is not installed (a platform without wheels) the process runs on asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

EVENT_LOOP_ENV = "CORNSERVE_EVENT_LOOP"

T = TypeVar("T")


def loop_factory(env: dict[str, str] | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory: uvloop's when the environment asks for it and it is installed; else None (asyncio's)."""
    choice = (os.environ if env is None else env).get(EVENT_LOOP_ENV, "uvloop").strip().lower()
    if choice in ("", "asyncio"):
        return None
    if choice != "uvloop":
        logger.warning("%s=%r is neither asyncio nor uvloop; running on asyncio", EVENT_LOOP_ENV, choice)
        return None
    try:
        import uvloop
    except ImportError:
        logger.debug("uvloop is not installed; running on asyncio")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
