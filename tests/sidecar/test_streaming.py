"""Streams through real sidecars (`cornserve.sidecar.streaming`): item i is chunk i of one id.

The consumer starts on the first item while the producer still produces; a writer never has more
than `window` chunks outstanding (a slow consumer bounds the producer's arena memory); end of
stream and a producer that failed reach the consumer, each within a deadline.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from tests.sidecar.test_drop import drop
from tests.support.waiting import wait_for

from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import DataDropped, RecvTimeout, SidecarTimeout
from cornserve.sidecar.streaming import StreamWriter, drain_stream, read_stream

ITEM = 1024  # floats per item: 4 KiB


def item(i: int) -> torch.Tensor:
    return torch.full((ITEM,), float(i))


@pytest.mark.parametrize("nodes", [["node-a", "node-a"], ["node-a", "node-b"]], ids=["shm", "tcp"])
async def test_the_consumer_starts_before_the_producer_finishes_and_sees_the_end(
    sidecars, nats_url, arenas_empty, nodes
) -> None:
    a, b = await sidecars(2, nodes=nodes)
    first_seen = asyncio.Event()
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:

        async def produce() -> None:
            async with StreamWriter(src, "s1", [[b.rank]], window=4, timeout=30) as writer:
                await writer.send(item(0))
                # The rest only comes once the consumer has the first item: a consumer that could
                # only start after the producer finished would never get here (its receive times out).
                await asyncio.wait_for(first_seen.wait(), 30)
                for i in range(1, 10):
                    await writer.send(item(i))

        producer = asyncio.create_task(produce())
        got = []
        async for value in read_stream(dst, "s1", timeout=30):
            got.append(float(value[0]))
            first_seen.set()
        await producer
        assert got == [float(i) for i in range(10)]
    await arenas_empty([a.rank, b.rank])


@pytest.mark.parametrize("nodes", [["node-a", "node-a"], ["node-a", "node-b"]], ids=["shm", "tcp"])
async def test_a_slow_consumer_holds_the_producer_to_its_window(
    sidecars, nats_url, stats_of, arenas_empty, nodes
) -> None:
    a, b = await sidecars(2, nodes=nodes)
    window = 3
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        writer = StreamWriter(src, "s2", [[b.rank]], window=window, timeout=30)

        async def produce() -> None:
            async with writer:
                for i in range(12):
                    await writer.send(item(i))

        producer = asyncio.create_task(produce())
        reader = read_stream(dst, "s2", timeout=30)
        first = await anext(reader)
        assert float(first[0]) == 0.0
        # The consumer holds item 0: the writer fills its window and then waits for chunk 0's release.
        await wait_for(lambda: writer.waiting_for == 0, 20, "the writer to wait for chunk 0")
        assert writer.sent == window
        held = (await stats_of([a.rank]))[a.rank]
        assert held.held_entries == window, held  # only the window's chunks exist at the producer's rank
        rest = [float(v[0]) async for v in reader]
        await producer
        assert rest == [float(i) for i in range(1, 12)]
        assert writer.waits >= 12 - window  # every send past the window waited for the consumer
    await arenas_empty([a.rank, b.rank])


async def test_a_failed_producer_reaches_the_consumer(sidecars, nats_url, arenas_empty) -> None:
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        with pytest.raises(RuntimeError, match="the model broke"):
            async with StreamWriter(src, "s3", [[b.rank]], timeout=30) as writer:
                await writer.send(item(0))
                raise RuntimeError("the model broke")
        reader = read_stream(dst, "s3", timeout=30)
        assert float((await anext(reader))[0]) == 0.0
        pending = asyncio.create_task(anext(reader))  # waits for chunk 1, which never comes
        await asyncio.sleep(0)
        # Whoever ran the graph gives it up and drops its forwards: the waiting receive fails now.
        await drop(nats_url, [a.rank, b.rank], ["s3"])
        with pytest.raises(DataDropped, match="its graph was given up"):
            await asyncio.wait_for(pending, 10)

        # A producer that hangs (nothing sent, nothing closed): the consumer's receive has a deadline.
        with pytest.raises(RecvTimeout, match="s4"):
            await anext(read_stream(dst, "s4", timeout=0.5))
    await arenas_empty([a.rank, b.rank])


async def test_a_consumer_that_stops_reading_fails_the_producer_at_its_deadline(sidecars, nats_url) -> None:
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src:
        writer = StreamWriter(src, "s5", [[b.rank]], window=2, timeout=1.0)
        await writer.send(item(0))
        await writer.send(item(1))
        with pytest.raises(SidecarTimeout, match=r"did not release chunk 0"):
            await writer.send(item(2))
        assert writer.sent == 2
        await writer.abandon()


async def test_a_dropped_stream_wakes_its_waiting_producer(sidecars, nats_url, arenas_empty) -> None:
    """The graph was given up while the producer waited for its window: it fails now, not at its deadline."""
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src:
        writer = StreamWriter(src, "s6", [[b.rank]], window=1, timeout=60)
        await writer.send(item(0))
        blocked = asyncio.create_task(writer.send(item(1)))
        await wait_for(lambda: writer.waiting_for == 0, 20, "the writer to wait for chunk 0")
        await drop(nats_url, [a.rank, b.rank], ["s6"])
        with pytest.raises(DataDropped):
            await asyncio.wait_for(blocked, 10)
        await writer.abandon()
    await arenas_empty([a.rank, b.rank])


async def test_a_consumer_that_stops_early_drains_the_rest_so_the_producer_finishes(
    sidecars, nats_url, stats_of, arenas_empty
) -> None:
    """`drain_on_close`: closing the reader before the end releases what the producer still sends."""
    a, b = await sidecars(2)
    window = 2
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        writer = StreamWriter(src, "s7", [[b.rank]], window=window, timeout=30)

        async def produce() -> None:
            async with writer:
                for i in range(10):
                    await writer.send(item(i))

        producer = asyncio.create_task(produce())
        reader = read_stream(dst, "s7", timeout=30, release_at_once=True, drain_on_close=True)
        first = await anext(reader)
        second = await anext(reader)
        assert (float(first[0]), float(second[0])) == (0.0, 1.0)
        # Items 0 and 1 were released before they were handed out: the writer is not held back by them.
        await wait_for(lambda: writer.sent >= 3, 20, "the writer to send past its window")
        await reader.aclose()  # stops after 2 of 10 items: the close reads and releases the other 8
        await asyncio.wait_for(producer, 30)
        assert writer.sent == 10
    await arenas_empty([a.rank, b.rank])


async def test_drain_stream_skips_what_was_released_and_ends_at_the_end(
    sidecars, nats_url, arenas_empty
) -> None:
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        async with StreamWriter(src, "s8", [[b.rank]], window=8, timeout=30) as writer:
            for i in range(5):
                await writer.send(item(i))
        for chunk in (0, 1):  # the consumer had read and released chunks 0 and 1 ...
            assert float((await dst.recv("s8", chunk, timeout=10))[0]) == float(chunk)
            await dst.mark_done("s8", chunk)
        # ... and drains from the chunk it was receiving when it stopped (1, released already).
        assert await drain_stream(dst, "s8", 1, timeout=10) == 3
    await arenas_empty([a.rank, b.rank])


async def test_release_at_once_needs_copies(sidecars, nats_url) -> None:
    (a,) = await sidecars(1)
    async with Sidecar(a.rank, nats_url) as sc:
        with pytest.raises(ValueError, match="copy=True"):
            await anext(read_stream(sc, "s9", copy=False, release_at_once=True))
