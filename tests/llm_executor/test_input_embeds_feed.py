"""The talker's feed stops without cancelling its read, and drains what its producer still sends.

The defect this pins (docs/reliability.md, "Early-stop drain"): the feed used to stop by cancelling
its task. A receive is a NATS request, which nats-py awaits with `asyncio.wait_for`; on Python 3.11
a cancellation that lands in the loop turn in which the reply arrives is swallowed (`wait_for`
returns the result). The feed then read on, waited for rows nobody would use, and `stop` never
returned, so nothing drained the stream and the producer's arena stayed full. That race is one loop
turn wide, so it is set up here with a stand-in sidecar whose receive is exactly such a
`wait_for`; the real-process test is `test_thinker_talker.py`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from tests.support.waiting import wait_for

from cornserve.llm_executor.input_embeds import InputEmbedsReader
from cornserve.sidecar.errors import AlreadyConsumed
from cornserve.task import DataForward, Stream, Tensor

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


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_stop_in_the_turn_a_chunk_arrives_still_drains_the_stream() -> None:
    sidecar = WaitForSidecar()
    reader = InputEmbedsReader(sidecar, timeout_s=10)  # type: ignore[arg-type]
    feed = reader.open(DataForward[Stream[Tensor]](), HIDDEN, lambda: None)
    sidecar.send(0)
    sidecar.send(1)
    await _turns()
    assert feed.received == 2 and sidecar.done == [0, 1]  # copied and released at once
    feed.consume(1)  # one row used: the feed reads chunk 2 (the read-ahead is 2 rows)
    await _turns()
    sidecar.send(2)  # chunk 2's reply arrives ...
    feed.stop()  # ... in the same loop turn as the stop
    # The producer goes on and closes the stream: every chunk is released, the feed's task ends.
    for chunk in range(3, 8):
        sidecar.send(chunk)
    sidecar.close(8)
    await wait_for(lambda: feed._task.done(), 10, "the feed's task to drain the stream and end")
    assert sorted(sidecar.done) == list(range(8))
    assert feed.received == 2 and not feed.closed and feed.error is None
    await reader.close()


async def test_a_feed_stopped_before_its_first_chunk_drains_from_chunk_0() -> None:
    sidecar = WaitForSidecar()
    reader = InputEmbedsReader(sidecar, timeout_s=10)  # type: ignore[arg-type]
    feed = reader.open(DataForward[Stream[Tensor]](), HIDDEN, lambda: None)
    feed.abandon()  # refused right after `open`
    for chunk in range(3):
        sidecar.send(chunk)
    sidecar.close(3)
    await wait_for(lambda: feed._task.done(), 10, "the feed's task to drain the stream and end")
    assert sorted(sidecar.done) == [0, 1, 2] and feed.received == 0
    await reader.close()


async def test_a_bad_row_fails_the_sequence_and_the_rest_is_drained() -> None:
    sidecar = WaitForSidecar()
    reader = InputEmbedsReader(sidecar, timeout_s=10)  # type: ignore[arg-type]
    feed = reader.open(DataForward[Stream[Tensor]](), HIDDEN, lambda: None)
    sidecar.send(0, torch.zeros(HIDDEN + 1))  # wrong width
    await wait_for(lambda: feed.error is not None, 10, "the feed to refuse the row")
    assert "hidden size 4" in feed.error.message  # type: ignore[union-attr]
    sidecar.send(1)
    sidecar.close(2)
    await wait_for(lambda: feed._task.done(), 10, "the feed's task to drain the stream and end")
    assert sorted(sidecar.done) == [0, 1]
    await reader.close()
