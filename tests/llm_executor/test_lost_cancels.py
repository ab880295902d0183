"""A cancel that `asyncio.wait_for` swallows does not leave a hidden-state sender or an embedding receive running.

A sidecar call is a NATS request, which nats-py awaits with `asyncio.wait_for`; on Python 3.11 a
cancel that lands in the loop turn in which the reply arrives is swallowed (`wait_for` returns the
reply). The race is one loop turn wide, so it is set up with stand-in sidecars whose calls are
exactly such `wait_for`s (`waitfor.py`, as for the talker's feed): the reply is set and the cancel
asked in the same turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from tests.llm_executor.waitfor import WaitForSidecar, loop_turns
from tests.support.waiting import wait_for

from cornserve.llm_executor.embeddings import EmbeddingReceiver
from cornserve.llm_executor.hidden_states import HiddenStateSender
from cornserve.task import DataForward, Stream, Tensor
from cornserve.task.builtins.embedding import EMBEDDING_META_CHUNK, EMBEDDING_TENSOR_CHUNK
from cornserve.task.builtins.thinker_talker import HiddenStatesTarget


class SendingSidecar:
    """What `StreamWriter` calls; each call waits with `asyncio.wait_for` for the test's reply to it."""

    rank = 0

    def __init__(self) -> None:
        self.futures: dict[Any, asyncio.Future[Any]] = {}
        self.sent: list[int] = []
        self.closed_streams: list[str] = []
        self.watching = False

    def of(self, key: Any) -> asyncio.Future[Any]:
        return self.futures.setdefault(key, asyncio.get_running_loop().create_future())

    async def wait(self, key: Any, timeout: float | None) -> Any:
        return await asyncio.wait_for(self.of(key), timeout)

    async def watch_releases(self, id: str) -> None:
        self.watching = True

    async def unwatch_releases(self, id: str) -> None:
        self.watching = False

    async def wait_released(self, id: str, chunk: int, timeout: float | None = None) -> None:
        await self.wait(("released", chunk), timeout)

    async def send(
        self, data: Any, id: str, dst: Any, *, chunk_id: int, timeout: float | None = None, **_: Any
    ) -> None:
        await self.wait(("sent", chunk_id), timeout)
        self.sent.append(chunk_id)

    async def close_stream(self, id: str, chunks: int, dst: Any, timeout: float | None = None) -> None:
        self.closed_streams.append(id)


async def test_an_abort_in_the_turn_a_send_completes_still_stops_the_sender() -> None:
    sidecar = SendingSidecar()
    forward = DataForward[Stream[Tensor]](dst_sidecar_ranks=[[1]])
    target = HiddenStatesTarget(forward=forward, tokens_per_chunk=1, window=4)
    sender = HiddenStateSender(sidecar, target, timeout_s=60)  # type: ignore[arg-type]
    sender.push(torch.zeros(4))
    await loop_turns()
    assert sidecar.watching and ("sent", 0) in sidecar.futures  # chunk 0's send waits for its reply
    sidecar.of(("sent", 0)).set_result(None)  # the reply arrives ...
    sender.abort()  # ... in the same loop turn as the abort
    await wait_for(lambda: sender._task.done(), 10, "the aborted sender's task to end")
    assert sender._task.cancelled()
    assert not sidecar.watching and sidecar.closed_streams == []  # abandoned, never closed


async def test_a_cancel_in_the_turn_the_tensor_arrives_ends_the_receive() -> None:
    sidecar = WaitForSidecar()
    receiver = EmbeddingReceiver(sidecar, timeout_s=60)  # type: ignore[arg-type]
    forward = DataForward[Tensor](dst_sidecar_ranks=[[0]])
    receiving = asyncio.create_task(receiver.receive_all([forward]))
    await loop_turns()
    assert EMBEDDING_TENSOR_CHUNK in sidecar.replies
    sidecar.send(EMBEDDING_TENSOR_CHUNK, torch.zeros(2, 4))  # the tensor arrives ...
    receiving.cancel()  # ... in the same loop turn as the cancel; the meta chunk never comes
    await wait_for(lambda: receiving.done(), 10, "the cancelled receive to end (not wait for the meta chunk)")
    with pytest.raises(asyncio.CancelledError):
        await receiving
    # The tensor it got is released now; the meta chunk is asked to be released too (best effort).
    assert sorted(sidecar.done) == sorted([EMBEDDING_TENSOR_CHUNK, EMBEDDING_META_CHUNK])
    await receiver.close()
