"""Eric's batcher: batches predicted short run on the event loop (cornserve.models.inline), long ones on its thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from cornserve.eric.batcher import DynamicBatcher
from cornserve.models.encoders import EncodedItem, Preprocessed
from cornserve.models.inline import InlineCost


def patches(count: int) -> Preprocessed:
    return Preprocessed("image", torch.zeros((count, 4)))


async def test_batches_predicted_short_run_on_the_loop_and_long_ones_on_the_thread() -> None:
    ran_on: list[str] = []

    def encode(items: list[Preprocessed]) -> list[EncodedItem]:
        # Stand-in for the model: 10 ms per patch, and where it ran.
        ran_on.append(threading.current_thread().name)
        time.sleep(0.01 * sum(int(i.pixels.shape[0]) for i in items))
        return [EncodedItem(i.modality, i.pixels, None) for i in items]

    cost = InlineCost(0.2)
    batcher = DynamicBatcher(encode, max_batch_size=4, inline=cost)
    batcher.start()
    try:
        async with asyncio.timeout(60):
            await batcher.encode([patches(1)])  # nothing measured yet: the thread
            [done] = await batcher.encode([patches(2)])  # predicted ~20 ms: the loop
            await batcher.encode([patches(50)])  # predicted ~0.5 s: the thread
    finally:
        await batcher.stop()
    loop_thread = threading.current_thread().name
    assert ran_on[1] == loop_thread
    assert ran_on[0] != loop_thread and ran_on[2] != loop_thread
    assert ran_on[0].startswith("eric-encode")
    assert done.embedding.shape == (2, 4)
    assert cost.inline_runs == 1


async def test_a_failing_inline_batch_fails_its_request_and_the_batcher_goes_on() -> None:
    calls = 0

    def encode(items: list[Preprocessed]) -> list[EncodedItem]:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first inline batch
            raise RuntimeError("boom")
        return [EncodedItem(i.modality, i.pixels, None) for i in items]

    cost = InlineCost(1.0)
    batcher = DynamicBatcher(encode, max_batch_size=2, inline=cost)
    batcher.start()
    try:
        async with asyncio.timeout(60):
            await batcher.encode([patches(1)])
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.encode([patches(1)])
            [ok] = await batcher.encode([patches(3)])
    finally:
        await batcher.stop()
    assert ok.embedding.shape == (3, 4) and cost.inline_runs == 1
