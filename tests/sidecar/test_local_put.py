"""A `put` over the control socket frees its reservation only while it is still its own.

In-process: a real arena and a real `LocalEndpoint` on a UNIX socket, with a stand-in send that
does what a fast consumer does between the send taking the bytes and the put's reply: releases the
block, and another request reserves the same offset. Freeing that one would hand a live tensor's
bytes to the next writer (it happened in the cluster tests: another request's tensor was read).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cornserve.bus.sidecar import DataMeta, Location, SendRequest, SidecarAck
from cornserve.bus.sidecar_local import PUT
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.arena import Arena, arena_name
from cornserve.sidecar.identity import ServerIdentity
from cornserve.sidecar.localclient import LocalChannel
from cornserve.sidecar.localserver import LocalEndpoint


async def test_a_put_does_not_free_a_reservation_that_reused_its_offset() -> None:
    me = ServerIdentity(rank=990, node="put-test", ttl_s=60, tcp_host="127.0.0.1")
    memory = ArenaMemory(me, 1 << 16)
    memory.open(Arena(arena_name(me.node, me.rank, me.instance), memory.size))
    reused: list[int] = []

    async def send(req: SendRequest) -> SidecarAck:
        offset = req.location.offset
        memory.take_unsent(offset)  # the send owns the bytes now
        memory.free(offset)  # its consumers released them at once
        again = await memory.reserve(req.location.size, 1.0)  # another request reserves the block
        reused.append(again.offset)
        assert again.offset == offset
        return me.ack(req.request_id)

    endpoint = LocalEndpoint(me, memory, {}, send, None)
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        await endpoint.start(Path(d) / "s")
        channel = LocalChannel(Path(d) / "s")
        try:
            payload = bytes(range(256))
            req = SendRequest(
                id="put-1",
                chunk_id=0,
                dst_ranks=[[991]],
                instance=me.instance,
                location=Location(size=256, meta=DataMeta(kind="numpy", nbytes=256)),
                timeout=5,
            )
            await channel.call(PUT, req, SidecarAck, 5, payload)
        finally:
            channel.close()
            await endpoint.close()
            memory.arena.close()
    # The other request's reservation is still there and still allocated.
    assert reused and list(memory.unsent) == reused
    assert memory.alloc.used_bytes > 0
