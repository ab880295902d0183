"""DynamicBatcher: requests that arrive while a batch runs are encoded together in the next batch;
the items pending at once are bounded (a full batcher refuses with 429)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from aiohttp import web

from cornserve.eric.batcher import DynamicBatcher, QueueFull
from cornserve.eric.server import RequestFailed
from cornserve.models.encoders import EncodedItem, Preprocessed


def item(value: float) -> Preprocessed:
    return Preprocessed("image", torch.full((1, 4), value))


async def test_requests_arriving_together_share_a_batch() -> None:
    started, release = threading.Event(), threading.Event()
    batches: list[list[float]] = []

    def encode(items: list[Preprocessed]) -> list[EncodedItem]:
        # Stand-in for the model: records the batch, and holds the first one until released.
        batches.append([float(i.pixels[0, 0]) for i in items])
        started.set()
        assert release.wait(timeout=60)
        return [EncodedItem(i.modality, i.pixels * 2, None) for i in items]

    batcher = DynamicBatcher(encode, max_batch_size=3)
    batcher.start()
    try:
        first = asyncio.create_task(batcher.encode([item(1)]))
        assert await asyncio.to_thread(started.wait, 60)
        second = asyncio.create_task(batcher.encode([item(2), item(3)]))
        third = asyncio.create_task(batcher.encode([item(4), item(5)]))
        await asyncio.sleep(0)  # let both requests queue their items
        release.set()
        async with asyncio.timeout(60):
            results = await asyncio.gather(first, second, third)
    finally:
        await batcher.stop()
    assert batches == [[1.0], [2.0, 3.0, 4.0], [5.0]]
    assert [[float(r.embedding[0, 0]) for r in res] for res in results] == [[2.0], [4.0, 6.0], [8.0, 10.0]]
    assert batcher.stats.largest_batch == 3 and batcher.stats.batches == 3 and batcher.stats.items == 5


async def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    calls = 0

    def encode(items: list[Preprocessed]) -> list[EncodedItem]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return [EncodedItem(i.modality, i.pixels, None) for i in items]

    batcher = DynamicBatcher(encode, max_batch_size=2)
    batcher.start()
    try:
        async with asyncio.timeout(60):
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.encode([item(1)])
            [ok] = await batcher.encode([item(2)])
    finally:
        await batcher.stop()
    assert float(ok.embedding[0, 0]) == 2.0


async def test_items_of_a_cancelled_request_are_dropped_before_encoding() -> None:
    started, release = threading.Event(), threading.Event()
    batches: list[list[float]] = []

    def encode(items: list[Preprocessed]) -> list[EncodedItem]:
        batches.append([float(i.pixels[0, 0]) for i in items])
        started.set()
        assert release.wait(timeout=60)
        return [EncodedItem(i.modality, i.pixels, None) for i in items]

    batcher = DynamicBatcher(encode, max_batch_size=4)
    batcher.start()
    try:
        first = asyncio.create_task(batcher.encode([item(1)]))
        assert await asyncio.to_thread(started.wait, 60)
        abandoned = asyncio.create_task(batcher.encode([item(2), item(3)]))
        kept = asyncio.create_task(batcher.encode([item(4)]))
        await asyncio.sleep(0)  # both requests queue their items behind the running batch
        abandoned.cancel()  # its handler was cancelled: the caller hung up
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        release.set()
        async with asyncio.timeout(60):
            await asyncio.gather(first, kept)
    finally:
        await batcher.stop()
    assert batches == [[1.0], [4.0]]
    assert batcher.stats.dropped == 2 and batcher.stats.items == 2


def test_pending_items_are_bounded_and_a_full_batcher_refuses_with_429() -> None:
    batcher = DynamicBatcher(lambda items: [], max_batch_size=2, max_pending=3)
    batcher.reserve(2)
    batcher.reserve(1)
    with pytest.raises(QueueFull, match=r"3 media item\(s\) are pending, the limit is 3"):
        batcher.reserve(1)
    batcher.release(2)
    with pytest.raises(QueueFull):
        batcher.reserve(3)  # 1 + 3 > 3
    batcher.reserve(2)
    batcher.release(2)
    batcher.release(1)
    assert batcher.pending == 0
    batcher.reserve(5)  # more than the limit, but nothing else pending: admitted, never refused forever
    assert batcher.pending == 5
    batcher.release(5)

    # What Eric's /embeddings answers for a QueueFull.
    response = RequestFailed(429, "overloaded", "full", {"Retry-After": "1"}).response()
    assert isinstance(response, web.Response)
    assert (response.status, response.headers["Retry-After"]) == (429, "1")
