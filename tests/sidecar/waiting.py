"""Polling with a deadline for sidecar tests: server-side effects (frees, lost marks) are asynchronous."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def wait_until(pred: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll ``pred`` until it holds; fail the test at ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached before the deadline")
