"""Transfers between real sidecar server processes over real shared memory and TCP."""

import asyncio
import threading

import numpy as np
import pytest
import torch

from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import AlreadyConsumed, DataExpired, MemoryPressure, TooLarge

MiB = 1024 * 1024


async def test_objects_numpy_and_torch_same_node(sidecars, nats_url, stats_of):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        t = torch.randn(64, 32)
        await src.send(t, "t", [[b.rank]])
        got = await dst.recv("t", timeout=5)
        assert isinstance(got, torch.Tensor) and torch.equal(got, t)
        await dst.mark_done("t")
        obj = {"a": [1, 2.5, "s", b"b", None, True]}
        await src.send(obj, "o", [[b.rank]])
        assert await dst.recv("o", timeout=5) == obj
        await dst.mark_done("o")
        arr = np.arange(12, dtype=np.int16).reshape(3, 4)
        await src.send(arr, "n", [[b.rank]])
        got_n = await dst.recv("n", timeout=5)
        assert isinstance(got_n, np.ndarray) and not got_n.flags.writeable
        np.testing.assert_array_equal(got_n, arr)
        with pytest.raises(ValueError):
            got_n[0, 0] = 1
        await dst.mark_done("n")
    stats = await stats_of([a.rank, b.rank])
    assert all(s.used_bytes == 0 for s in stats.values())


async def test_zero_copy_view_idempotent_recv_and_copy(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await src.send(torch.ones(1000), "z", [[b.rank]])
        v1 = await dst.recv("z", timeout=5)
        v2 = await dst.recv("z", timeout=5)  # idempotent until mark_done
        assert v1.data_ptr() == v2.data_ptr()  # both views over the same shared bytes: no copy
        c = await dst.recv("z", timeout=5, copy=True)
        assert c.data_ptr() != v1.data_ptr()
        c += 1  # a private copy is writable
        assert torch.equal(v1, torch.ones(1000))
        # The producer's server holds the bytes until the consumer is done.
        assert (await stats_of([a.rank]))[a.rank].used_bytes > 0
        await dst.mark_done("z")
        await dst.mark_done("z")  # idempotent
        with pytest.raises(AlreadyConsumed):
            await dst.recv("z", timeout=5)
    await arenas_empty([a.rank, b.rank])


async def test_alloc_tensor_is_sent_without_a_second_allocation(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        out = await src.alloc_tensor((256, 256), torch.float32)
        out.copy_(torch.arange(256 * 256, dtype=torch.float32).view(256, 256))
        before = (await stats_of([a.rank]))[a.rank]
        await src.send(out, "direct", [[b.rank]])
        after = (await stats_of([a.rank]))[a.rank]
        assert after.allocations == before.allocations == 1  # no copy-in allocation was made
        got = await dst.recv("direct", timeout=5)
        assert torch.equal(got, torch.arange(256 * 256, dtype=torch.float32).view(256, 256))
        await dst.mark_done("direct")
        # An unsent alloc_tensor can be handed back explicitly.
        spare = await src.alloc_tensor((10,), torch.int32)
        await src.free_tensor(spare)
    await arenas_empty([a.rank, b.rank])


async def test_broadcast_to_groups_frees_only_after_everyone_is_done(
    sidecars, nats_url, stats_of, arenas_empty
):
    a, b, c, d = await sidecars(4)
    async with (
        Sidecar(a.rank, nats_url) as src,
        Sidecar(b.rank, nats_url) as cb,
        Sidecar(c.rank, nats_url) as cc,
        Sidecar(d.rank, nats_url) as cd,
    ):
        t = torch.randn(128, 128)
        await src.send(t, "bc", [[b.rank, c.rank], [d.rank]])
        for cons in (cb, cc, cd):
            assert torch.equal(await cons.recv("bc", timeout=5), t)
        await cb.mark_done("bc")
        await cc.mark_done("bc")
        await asyncio.sleep(0.2)
        assert (await stats_of([a.rank]))[a.rank].used_bytes > 0  # d still reading
        await cd.mark_done("bc")
    await arenas_empty([a.rank, b.rank, c.rank, d.rank])


async def test_chunks_early_receive_and_end_of_stream(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        early = asyncio.create_task(dst.recv("ch", chunk_id=1, timeout=10))  # before anything was sent
        await asyncio.sleep(0.1)
        for i in range(3):
            await src.send(torch.full((10,), float(i)), "ch", [[b.rank]], chunk_id=i, num_chunks=3)
        assert torch.equal(await early, torch.full((10,), 1.0))
        for i in range(3):
            assert torch.equal(await dst.recv("ch", chunk_id=i, timeout=5), torch.full((10,), float(i)))
            await dst.mark_done("ch", i)
        assert await dst.recv("ch", chunk_id=3, timeout=5) is None
    await arenas_empty([a.rank, b.rank])


async def test_stream_of_unknown_length_then_close(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        waiting_past_end = asyncio.create_task(dst.recv("st", chunk_id=4, timeout=10))
        for i in range(4):
            await src.send(f"token-{i}", "st", [[b.rank]], chunk_id=i, num_chunks=None)
        got = []
        for i in range(4):
            got.append(await dst.recv("st", chunk_id=i, timeout=5))
            await dst.mark_done("st", i)
        assert got == [f"token-{i}" for i in range(4)]
        await src.close_stream("st", 4)
        assert await waiting_past_end is None
        assert await dst.recv("st", chunk_id=4, timeout=5) is None
    await arenas_empty([a.rank, b.rank])


async def test_ttl_frees_unclaimed_data_and_reports_expired(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2, ttl=0.5)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await src.send(torch.ones(4096), "ttl", [[b.rank]])
        await src.alloc_tensor((1024,), torch.float32)  # never sent: also reclaimed
        await arenas_empty([a.rank])
        with pytest.raises(DataExpired, match="ttl"):
            await dst.recv("ttl", timeout=5)
    assert "unclaimed" in a.log_path.read_text()


async def test_memory_pressure_waits_then_errors_and_unblocks_on_free(
    sidecars, nats_url, stats_of, arenas_empty
):
    (a,) = await sidecars(1, arena_bytes=4 * MiB)
    b, c = await sidecars(2)
    # Through the producer's own server (no direct sends): the pressure is on its small arena.
    async with Sidecar(a.rank, nats_url, direct_sends=False) as src, Sidecar(b.rank, nats_url) as dst:
        big = torch.zeros(3 * MiB // 4, dtype=torch.float32)  # 3 MiB
        await src.send(big, "p1", [[b.rank]])
        with pytest.raises(MemoryPressure, match="no room"):
            await src.send(big, "p2", [[b.rank]], timeout=0.5)
        with pytest.raises(TooLarge):
            await src.send(torch.zeros(2 * MiB), "huge", [[b.rank]], timeout=0.5)  # 8 MiB > arena
        blocked = asyncio.create_task(src.send(big, "p3", [[b.rank]], timeout=20))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        assert (await stats_of([a.rank]))[a.rank].pending_allocs == 0
        await dst.recv("p1", timeout=5)
        await dst.mark_done("p1")
        await blocked  # space freed -> the waiting sender proceeds
        await dst.recv("p3", timeout=5)
        await dst.mark_done("p3")
        # The server kept serving other requests throughout.
        assert (await stats_of([c.rank]))[c.rank].used_bytes == 0
    await arenas_empty([a.rank, b.rank])


async def test_cross_node_tcp_path_lands_in_destination_arena(sidecars, nats_url, stats_of, arenas_empty):
    a, b, c = await sidecars(3, nodes=["node-a", "node-b", "node-a"])
    async with (
        Sidecar(a.rank, nats_url) as src,
        Sidecar(b.rank, nats_url) as remote,
        Sidecar(c.rank, nats_url) as local,
    ):
        t = torch.randn(3 * MiB // 4 + 5)  # not a multiple of the socket chunk size
        await src.send(t, "x", [[b.rank], [c.rank]])
        stats = await stats_of([a.rank, b.rank])
        assert stats[b.rank].used_bytes > 0  # bytes were copied into node-b's own arena
        got_remote = await remote.recv("x", timeout=5)
        assert torch.equal(got_remote, t)
        assert torch.equal(await local.recv("x", timeout=5), t)
        await remote.mark_done("x")
        await local.mark_done("x")
        # Objects and numpy across nodes too.
        await src.send({"k": "v"}, "o", [[b.rank]])
        assert await remote.recv("o", timeout=5) == {"k": "v"}
        await remote.mark_done("o")
    await arenas_empty([a.rank, b.rank, c.rank])


def test_sync_api_from_plain_threads(sidecars, nats_url, stats_of, arenas_empty):
    async def start():
        return await sidecars(2)

    loop = asyncio.new_event_loop()
    try:
        a, b = loop.run_until_complete(start())
        src = Sidecar(a.rank, nats_url).connect_sync()
        dst = Sidecar(b.rank, nats_url).connect_sync()
        results: dict[str, object] = {}

        def consumer():
            results["v"] = dst.recv_sync("sync", timeout=10, copy=True)
            dst.mark_done_sync("sync")

        th = threading.Thread(target=consumer)
        th.start()
        src.send_sync(torch.arange(10), "sync", [[b.rank]])
        th.join(timeout=30)
        assert torch.equal(results["v"], torch.arange(10))
        src.close_sync()
        dst.close_sync()
        loop.run_until_complete(arenas_empty([a.rank, b.rank]))
    finally:
        loop.close()


async def test_cross_node_receiver_pressure_and_too_large_are_reported(
    sidecars, nats_url, stats_of, arenas_empty
):
    (a,) = await sidecars(1, nodes=["node-a"])
    (b,) = await sidecars(1, nodes=["node-b"], arena_bytes=4 * MiB)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        three = torch.zeros(3 * MiB // 4)
        await src.send(three, "r1", [[b.rank]])
        with pytest.raises(MemoryPressure, match=f"rank {b.rank}"):
            await src.send(three, "r2", [[b.rank]], timeout=0.5)
        with pytest.raises(TooLarge):
            await src.send(torch.zeros(2 * MiB), "r3", [[b.rank]], timeout=5)
        await dst.recv("r1", timeout=5)
        await dst.mark_done("r1")
    await arenas_empty([a.rank, b.rank])


async def test_bytes_streaming_to_a_remote_node_are_not_reused_after_local_release(
    sidecars, nats_url, stats_of, arenas_empty
):
    # Source arena fits one 40 MiB tensor only. The local consumer releases while the TCP copy to the
    # remote node may still be reading the source arena; a second send must wait, not overwrite it.
    (a,) = await sidecars(1, nodes=["node-a"], arena_bytes=64 * MiB)
    c, d = await sidecars(2, nodes=["node-a", "node-b"], arena_bytes=64 * MiB)
    async with (
        Sidecar(a.rank, nats_url) as src,
        Sidecar(a.rank, nats_url) as src2,
        Sidecar(c.rank, nats_url) as local,
        Sidecar(d.rank, nats_url) as remote,
    ):
        ones = torch.ones(10 * MiB)  # 40 MiB
        first = asyncio.create_task(src.send(ones, "big", [[c.rank], [d.rank]]))
        assert torch.equal(await local.recv("big", timeout=30), ones)
        await local.mark_done("big")
        second = asyncio.create_task(src2.send(torch.full((10 * MiB,), 2.0), "big2", [[c.rank]], timeout=30))
        await first
        await second
        assert torch.equal(await remote.recv("big", timeout=30), ones)
        await remote.mark_done("big")
        assert torch.equal(await local.recv("big2", timeout=30), torch.full((10 * MiB,), 2.0))
        await local.mark_done("big2")
    await arenas_empty([a.rank, c.rank, d.rank])
