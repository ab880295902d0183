"""Spare reservations: a repeated copy send writes into the block reserved after the last one.

Real sidecar servers and clients. Where a chunk's bytes landed is read off the consumer's zero-copy
views (their addresses in the producer's arena): the servers' allocator is first-fit, so in a fresh
arena a send that used its spare lands right after the first chunk, and one that allocated anew
lands after the spare.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from tests.support.waiting import wait_for

from cornserve.sidecar import Sidecar
from cornserve.sidecar.allocator import aligned
from cornserve.sidecar.spares import ARENA_SHARE, MAX_SIZES, Spares

KiB = 1024
SIZE = 256 * KiB
"""Over the inline `put` limit, so sends copy into the arena."""


def _tensor(value: float) -> torch.Tensor:
    return torch.full((SIZE // 4,), value, dtype=torch.float32)


async def _spares_on(stats_of, rank: int, n: int) -> None:  # type: ignore[no-untyped-def]
    async def held() -> bool:
        return (await stats_of([rank]))[rank].spare_allocs == n

    await wait_for(held, 10.0, f"{n} spare reservation(s) on rank {rank}", interval=0.02)


async def test_a_repeated_copy_send_lands_in_the_spare_and_close_frees_it(
    sidecars, nats_url, stats_of, arenas_empty
) -> None:
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as dst:
        # Spares in the producer's own arena (spares in a direct destination's arena:
        # tests/sidecar/test_direct_send.py).
        async with Sidecar(b.rank, nats_url, direct_sends=False) as src:
            await src.send(_tensor(1.0), "sp-0", [[a.rank]])
            await _spares_on(stats_of, b.rank, 1)
            stats = (await stats_of([b.rank]))[b.rank]
            # The spare is reported apart: the arena's used bytes are the one chunk in flight.
            assert stats.used_bytes == aligned(SIZE) and stats.allocations == 1
            assert stats.spare_bytes == aligned(SIZE) and stats.pending_allocs == 0

            await src.send(_tensor(2.0), "sp-1", [[a.rank]])
            await _spares_on(stats_of, b.rank, 1)  # used, and the next one reserved
            first = await dst.recv("sp-0")
            second = await dst.recv("sp-1")
            assert torch.equal(first, _tensor(1.0)) and torch.equal(second, _tensor(2.0))
            assert second.data_ptr() - first.data_ptr() == aligned(SIZE), (
                "the second send did not use its spare"
            )
            del first, second
            await dst.mark_done("sp-0")
            await dst.mark_done("sp-1")
        # Closing the producer gave its spare back.
        stats = (await stats_of([b.rank]))[b.rank]
        assert stats.spare_allocs == 0 and stats.spare_bytes == 0
        await arenas_empty([a.rank, b.rank])


async def test_a_client_without_spares_reserves_nothing_ahead(
    sidecars, nats_url, stats_of, arenas_empty
) -> None:
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as dst, Sidecar(b.rank, nats_url, keep_spares=False) as src:
        for k in range(3):
            await src.send(_tensor(float(k)), f"ns-{k}", [[a.rank]])
            got = await dst.recv(f"ns-{k}", copy=True)
            await dst.mark_done(f"ns-{k}")
            assert torch.equal(got, _tensor(float(k)))
        await asyncio.sleep(0.3)  # a reservation would have been asked for right after each send
        stats = (await stats_of([b.rank]))[b.rank]
        assert stats.spare_allocs == 0 and stats.spare_bytes == 0
    await arenas_empty([a.rank, b.rank])


async def test_spares_stay_within_their_share_of_a_small_arena(sidecars, nats_url, stats_of) -> None:
    # 2 MiB arena: a 256 KiB spare would be over 1/16 of it, so none is kept.
    a, b = await sidecars(2, arena_bytes=2 * 1024 * KiB)
    async with Sidecar(a.rank, nats_url) as dst, Sidecar(b.rank, nats_url) as src:
        await src.send(_tensor(3.0), "small-arena", [[a.rank]])
        got = await dst.recv("small-arena", copy=True)
        await dst.mark_done("small-arena")
        assert torch.equal(got, _tensor(3.0))
        await asyncio.sleep(0.3)
        assert (await stats_of([b.rank]))[b.rank].spare_allocs == 0


def test_a_spare_is_not_used_once_half_the_ttl_passed_or_from_another_instance(monkeypatch) -> None:
    spares = Spares()
    arena = 64 << 20
    assert spares.wants(SIZE, arena)
    spares.reserving(SIZE)
    assert not spares.wants(SIZE, arena), "a reservation of that size is already under way"
    from cornserve.sidecar.spares import Spare

    assert spares.reserved(Spare("inst-1", 0, SIZE), SIZE)
    spare, stale = spares.take(SIZE, "inst-1", ttl_s=60.0)
    assert spare is not None and spare.offset == 0 and stale == []

    spares.reserving(SIZE)
    spares.reserved(Spare("inst-1", 4096, SIZE), SIZE)
    later = time.monotonic() + 31.0  # past half the 60 s TTL: the server may reclaim it soon
    monkeypatch.setattr("cornserve.sidecar.spares.time.monotonic", lambda: later)
    spare, stale = spares.take(SIZE, "inst-1", ttl_s=60.0)
    assert spare is None and [s.offset for s in stale] == [4096]

    monkeypatch.undo()
    spares.reserving(SIZE)
    spares.reserved(Spare("inst-1", 8192, SIZE), SIZE)
    spare, stale = spares.take(SIZE, "inst-2", ttl_s=60.0)  # the server restarted
    assert spare is None and [s.instance for s in stale] == ["inst-1"]


@pytest.mark.parametrize("arena", [64 << 20, 1 << 30])
def test_spares_are_bounded_in_sizes_and_bytes(arena: int) -> None:
    spares = Spares()
    sizes = [SIZE * (k + 1) for k in range(MAX_SIZES + 1)]
    for size in sizes[:MAX_SIZES]:
        assert spares.wants(size, arena)
        spares.reserving(size)
    assert not spares.wants(sizes[MAX_SIZES], arena), "no more sizes than MAX_SIZES"
    assert not Spares().wants(arena // ARENA_SHARE + 1, arena), "no spare over the arena share"
