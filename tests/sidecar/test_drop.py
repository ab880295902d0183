"""Dropping a given-up graph's data (`DropRequest`, `cornserve.sidecar.dropping`) on real servers.

A dispatcher that gives up a graph tells the sidecars of its forwards to drop them: what they hold
is freed at once (not at the TTL), and what arrives later for those ids is refused or freed.
"""

from __future__ import annotations

import time

import nats
import pytest
import torch

from cornserve.bus.micro import request
from cornserve.bus.sidecar import DropRequest, SidecarAck
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import DataDropped


async def drop(nats_url: str, ranks: list[int], ids: list[str]) -> None:
    nc = await nats.connect(nats_url)
    try:
        for rank in ranks:
            req = DropRequest(ids=ids, reason="test: its graph was cancelled")
            await request(nc, sidecar_subject(rank, SidecarVerb.DROP), req, SidecarAck, 5.0)
    finally:
        await nc.close()


async def test_drop_frees_held_and_received_chunks_and_refuses_late_ones(
    sidecars, nats_url, stats_of
) -> None:
    # a (node-a) sends to b (node-a: a holds the bytes) and c (node-b: a TCP copy lands in c's arena).
    a, b, c = await sidecars(
        3, nodes=["node-a", "node-a", "node-b"]
    )  # TTL 300 s: only a drop frees them soon
    ranks = [a.rank, b.rank, c.rank]
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await src.send(torch.ones(4096), "fwd", [[b.rank], [c.rank]], chunk_id=0, num_chunks=2)
        before = await stats_of(ranks)
        assert before[a.rank].used_bytes > 0 and before[c.rank].used_bytes > 0

        await drop(nats_url, ranks, ["fwd", "unknown-id"])
        after = await stats_of(ranks)
        assert all(s.used_bytes == 0 and s.held_entries == 0 for s in after.values()), after
        assert after[a.rank].dropped_total == 1 and after[c.rank].dropped_total == 1, after
        assert all(s.expired_total == 0 and s.lost_total == 0 for s in after.values())

        # A receive of a dropped id fails at once instead of waiting for its timeout.
        started = time.monotonic()
        with pytest.raises(DataDropped, match="its graph was given up"):
            await dst.recv("fwd", chunk_id=0, timeout=30)
        assert time.monotonic() - started < 10
        # A late send of the same id (a producer that missed the cancel) is refused; nothing stays.
        with pytest.raises(DataDropped):
            await src.send(torch.ones(4096), "fwd", [[b.rank], [c.rank]], chunk_id=1, num_chunks=2)
        late = await stats_of(ranks)
        assert all(s.used_bytes == 0 and s.held_entries == 0 for s in late.values()), late

        # Other ids are untouched by it: the sidecars keep serving.
        await src.send(torch.full((8,), 3.0), "other", [[b.rank]])
        assert torch.equal(await dst.recv("other", timeout=10), torch.full((8,), 3.0))
        await dst.mark_done("other")


async def test_a_delivery_after_the_drop_is_freed_on_arrival(
    sidecars, nats_url, stats_of, arenas_empty
) -> None:
    """The destination heard of the drop before the source sent (the source's drop was missed)."""
    a, c = await sidecars(2, nodes=["node-a", "node-b"])
    await drop(nats_url, [c.rank], ["late"])
    async with Sidecar(a.rank, nats_url) as src:
        await src.send(torch.ones(4096), "late", [[c.rank]])  # its TCP copy lands in c and is freed there
    await arenas_empty([a.rank, c.rank], timeout=5)
    stats = await stats_of([a.rank, c.rank])
    assert stats[c.rank].dropped_total == 1 and stats[c.rank].mailbox_entries == 0, stats[c.rank]
