"""The start-up and shutdown sequence every executor process follows.

Order matters to the task manager: the HTTP port opens first (so `/health` answers 503 while the
process loads), then the slow initialisation runs; SIGTERM/SIGINT at any point stops it cleanly.
Exit code 0 after a signal, 1 when the port cannot be opened or initialisation fails.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Protocol


def sidecar_ranks_arg(text: str) -> list[int]:
    """Argparse type of `--sidecar-ranks`: comma-separated ranks >= 0 (empty allowed)."""
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"sidecar ranks are comma-separated integers, got {text!r}"
        ) from None
    if any(r < 0 for r in ranks):
        raise argparse.ArgumentTypeError(f"sidecar ranks must be >= 0, got {text!r}")
    return ranks


def required_sidecar_ranks_arg(text: str) -> list[int]:
    """`sidecar_ranks_arg` for executors that cannot work without a sidecar (at least one rank)."""
    ranks = sidecar_ranks_arg(text)
    if not ranks:
        raise argparse.ArgumentTypeError(f"at least one sidecar rank is needed, got {text!r}")
    return ranks


class ExecutorProcess(Protocol):
    """What `run_executor` drives."""

    async def start_http(self) -> None:
        """Open the HTTP port (health 503 until initialised)."""

    async def initialize(self) -> None:
        """Load models / libraries / clients; health turns 200 when done."""

    async def stop(self) -> None:
        """Drain and close everything; safe to call in any state."""


async def run_executor(
    server: ExecutorProcess,
    name: str,
    address: str,
    logger: logging.Logger,
    expected_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run `server` until SIGTERM/SIGINT; returns the process exit code.

    Start-up errors of the `expected_errors` types say what to fix and are logged without a
    traceback; anything else is a bug and is logged with one.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        await server.start_http()
        init = asyncio.create_task(server.initialize())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({init, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not init.done():
            logger.info("%s stopped while starting", name)
            init.cancel()
            await asyncio.gather(init, return_exceptions=True)
        elif (exc := init.exception()) is not None:
            trace = None if isinstance(exc, expected_errors) else exc
            logger.error("%s failed to start: %s: %s", name, type(exc).__name__, exc, exc_info=trace)
            code = 1
        else:
            await stopped
        stopped.cancel()
    except OSError as exc:
        logger.error("%s cannot listen on %s: %s", name, address, exc)
        code = 1
    finally:
        await server.stop()
    return code
