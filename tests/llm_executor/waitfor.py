"""Stand-in sidecars whose calls wait with `asyncio.wait_for`, as nats-py's request does.

On Python 3.11 a cancel that lands in the loop turn in which a `wait_for`'s result arrives is
swallowed (`wait_for` returns the result): the tests that pin the code paths which must not lose
such a cancel set that loop turn up with these stand-ins (docs/reliability.md, "Early-stop drain").
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from cornserve.sidecar.errors import AlreadyConsumed

HIDDEN = 4


class WaitForSidecar:
    """Chunks the test hands out one by one; a receive waits with `asyncio.wait_for`, as nats-py's request does."""

    rank = 0

    def __init__(self) -> None:
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self.done: list[int] = []

    def reply(self, chunk: int) -> asyncio.Future[Any]:
        return self.replies.setdefault(chunk, asyncio.get_running_loop().create_future())

    def send(self, chunk: int, value: Any = None) -> None:
        self.reply(chunk).set_result(torch.full((HIDDEN,), float(chunk)) if value is None else value)

    def close(self, chunks: int) -> None:
        self.reply(chunks).set_result(None)

    async def recv(self, id: str, chunk: int = 0, timeout: float | None = None, copy: bool = False) -> Any:
        if chunk in self.done:
            raise AlreadyConsumed(f"chunk {chunk} was already marked done")
        return await asyncio.wait_for(self.reply(chunk), timeout)

    async def mark_done(self, id: str, chunk: int = 0) -> None:
        self.done.append(chunk)


async def loop_turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)
