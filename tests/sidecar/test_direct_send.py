"""Copy sends to one same-node rank go straight to that rank's server (`cornserve.sidecar.directsend`).

Real sidecar server processes. Which path a send took is read from the servers' stats: a server
counts every chunk it delivers (``sent_by_path``), so a direct send is counted by the destination's
server (its send to itself) and not by the producer's; while unconsumed, its bytes occupy the
destination's arena, not the producer's.
"""

from __future__ import annotations

import asyncio
import threading

import nats
import numpy as np
import pytest
import torch
from tests.support.waiting import wait_for

from cornserve.bus.sidecar import StatsReply
from cornserve.sidecar import Sidecar, directsend

SMALL = 4096  # bytes: well under the inline-send size: one `put`
BIG = 1 << 20  # bytes: over it: written into the destination's arena, then `send`


def _delivered(stats: dict[int, StatsReply], rank: int) -> int:
    return int(stats[rank].sent_by_path.get("shm", 0))


async def _until_direct(src: Sidecar, dst: Sidecar, dst_rank: int, stats_of, prefix: str) -> int:
    """Send small items until the destination's server delivers one itself; returns how many were sent.

    The first send to a rank takes the peer path while the client looks the rank up in the background.
    """
    sent = 0

    async def direct_now() -> bool:
        nonlocal sent
        before = await stats_of([dst_rank])
        value = np.full(SMALL // 4, sent, dtype=np.float32)
        await src.send(value, f"{prefix}-{sent}", [[dst_rank]])
        np.testing.assert_array_equal(await dst.recv(f"{prefix}-{sent}", timeout=10), value)
        await dst.mark_done(f"{prefix}-{sent}")
        sent += 1
        after = await stats_of([dst_rank])
        return _delivered(after, dst_rank) > _delivered(before, dst_rank)

    await wait_for(direct_now, 20, f"a send to rank {dst_rank} to go direct", interval=0.05)
    return sent


async def test_a_small_send_to_one_same_node_rank_lands_in_its_arena(
    sidecars, nats_url, stats_of, arenas_empty
):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await _until_direct(src, dst, b.rank, stats_of, "warm")
        before = await stats_of([a.rank, b.rank])
        value = torch.arange(SMALL // 4, dtype=torch.float32)
        await src.send(value, "direct", [[b.rank]])
        held = await stats_of([a.rank, b.rank])
        # Sent and not consumed yet: the bytes are in the destination's arena, delivered by its server.
        assert held[b.rank].used_bytes >= SMALL and held[a.rank].used_bytes == 0
        assert _delivered(held, b.rank) == _delivered(before, b.rank) + 1
        assert _delivered(held, a.rank) == _delivered(before, a.rank)
        got = await dst.recv("direct", timeout=10)
        assert torch.equal(got, value)
        del got
        await dst.mark_done("direct")
        # Plain objects too, and several bounded chunks of one id.
        await src.send({"k": [1, 2]}, "obj", [[b.rank]], chunk_id=0, num_chunks=2)
        await src.send(b"second", "obj", [[b.rank]], chunk_id=1, num_chunks=2)
        assert await dst.recv("obj", chunk_id=0, timeout=10) == {"k": [1, 2]}
        assert await dst.recv("obj", chunk_id=1, timeout=10) == b"second"
        await dst.mark_done("obj", 0)
        await dst.mark_done("obj", 1)
        # Bigger than a put: written by the producer into b's arena, then a spare is reserved there.
        big = torch.arange(BIG // 4, dtype=torch.float32)
        for k in range(3):
            await src.send(big + k, f"big-{k}", [[b.rank]])
            held = await stats_of([a.rank, b.rank])
            assert held[b.rank].used_bytes >= BIG and held[a.rank].used_bytes == 0
            got = await dst.recv(f"big-{k}", timeout=10)
            assert torch.equal(got, big + k)
            del got
            await dst.mark_done(f"big-{k}")
        after = await stats_of([a.rank, b.rank])
        assert _delivered(after, a.rank) == _delivered(before, a.rank)
        assert _delivered(after, b.rank) == _delivered(before, b.rank) + 6
        assert after[b.rank].spare_bytes >= BIG and after[a.rank].spare_bytes == 0
    await arenas_empty([a.rank, b.rank])
    assert (await stats_of([b.rank]))[b.rank].spare_bytes == 0  # the client gave its spare back at close


async def test_streams_groups_notifications_and_arena_tensors_take_the_peer_path(
    sidecars, nats_url, stats_of, arenas_empty
):
    a, b, c = await sidecars(3)
    async with (
        Sidecar(a.rank, nats_url) as src,
        Sidecar(b.rank, nats_url) as dst,
        Sidecar(c.rank, nats_url) as other,
    ):
        await _until_direct(src, dst, b.rank, stats_of, "warm")
        before = await stats_of([a.rank])
        small = np.arange(SMALL // 4, dtype=np.float32)
        await src.send(small, "stream", [[b.rank]], chunk_id=0, num_chunks=None)  # a stream
        await src.close_stream("stream", 1)  # the producer's server knows the stream's destinations
        await src.send(small, "group", [[b.rank, c.rank]])  # more than one destination
        await src.watch_releases("notify")
        await src.send(small, "notify", [[b.rank]], notify_released=True)  # a release notification
        in_arena = await src.alloc_tensor((BIG // 4,), torch.float32)  # already in a's arena: no copy
        in_arena.fill_(7.0)
        await src.send(in_arena, "arena", [[b.rank]])
        for key in ("stream", "group", "notify"):
            np.testing.assert_array_equal(await dst.recv(key, timeout=10), small)
            await dst.mark_done(key)
        assert await dst.recv("stream", chunk_id=1, timeout=10) is None
        np.testing.assert_array_equal(await other.recv("group", timeout=10), small)
        await other.mark_done("group")
        assert torch.equal(await dst.recv("arena", timeout=10), torch.full((BIG // 4,), 7.0))
        await dst.mark_done("arena")
        await src.wait_released("notify", 0, timeout=10)
        after = await stats_of([a.rank])
        assert _delivered(after, a.rank) == _delivered(before, a.rank) + 5  # group: one per destination
    await arenas_empty([a.rank, b.rank, c.rank])


async def test_another_node_is_never_put_to_directly(sidecars, nats_url, stats_of, arenas_empty):
    a, far = await sidecars(2, nodes=["node-a", "node-b"])
    async with Sidecar(a.rank, nats_url) as src, Sidecar(far.rank, nats_url) as dst:
        for k in range(20):  # long enough for the background lookup to have answered
            await src.send({"k": k}, f"far-{k}", [[far.rank]])
            assert await dst.recv(f"far-{k}", timeout=10) == {"k": k}
            await dst.mark_done(f"far-{k}")
        stats = await stats_of([a.rank, far.rank])
        assert stats[a.rank].sent_by_path.get("tcp") == 20 and "shm" not in stats[far.rank].sent_by_path
    await arenas_empty([a.rank, far.rank])


async def test_a_full_destination_arena_falls_back_to_the_peer_path(
    sidecars, nats_url, stats_of, arenas_empty
):
    a, b = await sidecars(2, arena_bytes=1 << 20)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await _until_direct(src, dst, b.rank, stats_of, "warm")
        hog = await dst.alloc_tensor(((1 << 20) // 4,), torch.float32)  # the whole arena of b
        before = await stats_of([a.rank])
        value = np.ones(SMALL // 4, dtype=np.float32)
        big = np.ones(BIG // 8, dtype=np.float32)  # over the put size: needs a block of b's arena
        await src.send(value, "full", [[b.rank]], timeout=10)
        await src.send(big, "full-big", [[b.rank]], timeout=10)
        np.testing.assert_array_equal(await dst.recv("full", timeout=10), value)
        np.testing.assert_array_equal(await dst.recv("full-big", timeout=10), big)
        await dst.mark_done("full")
        await dst.mark_done("full-big")
        after = await stats_of([a.rank])
        assert _delivered(after, a.rank) == _delivered(before, a.rank) + 2  # delivered by a, from a's arena
        await dst.free_tensor(hog)
    await arenas_empty([a.rank, b.rank])


async def test_a_restarted_destination_still_gets_its_sends(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src:
        async with Sidecar(b.rank, nats_url) as dst:
            await _until_direct(src, dst, b.rank, stats_of, "warm")
            old = (await dst.info()).instance
        b.stop()
        b.restart()
        await b.wait_ready(not_instance=old)
        async with Sidecar(b.rank, nats_url) as dst:
            for k in range(3):  # the stale channel fails once; sends go on over the peer path, then direct
                await src.send({"k": k}, f"after-{k}", [[b.rank]], timeout=10)
                assert await dst.recv(f"after-{k}", timeout=10) == {"k": k}
                await dst.mark_done(f"after-{k}")
            await _until_direct(src, dst, b.rank, stats_of, "again")
    await arenas_empty([a.rank, b.rank])


@pytest.mark.parametrize("keep_spares", [True, False])
async def test_sending_to_ones_own_rank_is_unchanged(sidecars, nats_url, stats_of, arenas_empty, keep_spares):
    (a,) = await sidecars(1)
    async with Sidecar(a.rank, nats_url, keep_spares=keep_spares) as c:
        for k in range(5):
            await c.send({"k": k}, f"self-{k}", [[a.rank]])
            assert await c.recv(f"self-{k}", timeout=10) == {"k": k}
            await c.mark_done(f"self-{k}")
    assert _delivered(await stats_of([a.rank]), a.rank) == 5
    await arenas_empty([a.rank])


async def test_a_send_during_a_lookup_does_not_start_a_second_one(sidecars, nats_url, monkeypatch):
    """A lookup maps the destination's arena in a thread; a send meanwhile found the rank neither
    known nor being looked up and started a second lookup, whose peer then replaced the first's,
    connections and spares included (an unclosed socket, found by the leak test)."""
    a, b = await sidecars(2)
    maps: list[str] = []
    release = threading.Event()
    real_map = directsend.map_arena

    def held_map(*args, **kwargs):
        maps.append(args[0])
        assert release.wait(30), "the test never released the arena mapping"
        return real_map(*args, **kwargs)

    monkeypatch.setattr(directsend, "map_arena", held_map)
    nc = await nats.connect(nats_url)
    peers = directsend.DirectPeers(a.rank)
    try:
        node = b.node
        assert peers.peer(b.rank, nc, node) is None  # starts the lookup
        await wait_for(lambda: len(maps) == 1, 20, "the lookup to map the arena")
        for _ in range(3):  # sends while the arena is being mapped
            assert peers.peer(b.rank, nc, node) is None
            await asyncio.sleep(0.05)
        release.set()
        await wait_for(lambda: peers.peer(b.rank, nc, node) is not None, 20, "the destination to be known")
        assert len(maps) == 1, maps
    finally:
        release.set()
        await peers.close()
        await nc.close()
