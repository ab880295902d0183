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

import torch
from tests.llm_executor.waitfor import HIDDEN, WaitForSidecar, loop_turns
from tests.support.waiting import wait_for

from cornserve.llm_executor.input_embeds import InputEmbedsReader
from cornserve.task import DataForward, Stream, Tensor


async def test_a_stop_in_the_turn_a_chunk_arrives_still_drains_the_stream() -> None:
    sidecar = WaitForSidecar()
    reader = InputEmbedsReader(sidecar, timeout_s=10)  # type: ignore[arg-type]
    feed = reader.open(DataForward[Stream[Tensor]](), HIDDEN, lambda: None)
    sidecar.send(0)
    sidecar.send(1)
    await loop_turns()
    assert feed.received == 2 and sidecar.done == [0, 1]  # copied and released at once
    feed.consume(1)  # one row used: the feed reads chunk 2 (the read-ahead is 2 rows)
    await loop_turns()
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
