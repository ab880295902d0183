"""The same-node control socket: used by clients and peers, owner-only, and a trust boundary.

Real sidecar server processes; the refusal tests speak the socket's framing by hand, as a local
process that is not a sidecar would.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from cornserve.bus.schemas import ErrorReply
from cornserve.bus.sidecar import (
    DataMeta,
    DeliverRequest,
    InfoReply,
    Location,
    SendRequest,
    SidecarAck,
    StatsReply,
    StatsRequest,
)
from cornserve.bus.sidecar_local import (
    CHALLENGE_BYTES,
    MAX_JSON_BYTES,
    OK,
    ONE_WAY,
    PUT,
    REPLY_HEAD,
    REQUEST_HEAD,
    LocalHello,
)
from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import MemoryPressure, SidecarError
from cornserve.sidecar.localclient import LocalChannel, LocalErrorReply
from cornserve.sidecar.peerauth import PeerKey


async def _info(rank: int, nats_url: str) -> InfoReply:
    async with Sidecar(rank, nats_url) as c:
        return await c.info()


class Raw:
    """A hand-driven connection to a control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, challenge: str) -> None:
        self.reader, self.writer, self.challenge = reader, writer, challenge

    @classmethod
    async def connect(cls, path: str) -> Raw:
        reader, writer = await asyncio.open_unix_connection(path)
        challenge = (await asyncio.wait_for(reader.readexactly(CHALLENGE_BYTES), 10)).decode()
        return cls(reader, writer, challenge)

    async def ask(self, verb: str, body: bytes, payload: bytes = b"") -> tuple[int, bytes]:
        v = verb.encode()
        self.writer.write(REQUEST_HEAD.pack(len(v), len(body), len(payload), 0) + v + body + payload)
        head = await asyncio.wait_for(self.reader.readexactly(REPLY_HEAD.size), 10)
        code, n = REPLY_HEAD.unpack(head)
        return code, await asyncio.wait_for(self.reader.readexactly(n), 10)

    def close(self) -> None:
        self.writer.close()


async def test_socket_is_owner_only_and_removed_at_stop(sidecars, nats_url):
    (a,) = await sidecars(1)
    info = await _info(a.rank, nats_url)
    path = Path(info.local_socket)
    assert path.parent.parent == Path("/dev/shm")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_uid == os.getuid()
    a.stop()
    assert not path.parent.exists()


async def test_same_node_sends_go_over_the_socket_not_nats(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    before = await stats_of([a.rank, b.rank])
    # No spare reservations: the count of the source's requests below is exact; no direct sends
    # (tests/sidecar/test_direct_send.py): every send goes through the source's server.
    async with (
        Sidecar(a.rank, nats_url, keep_spares=False, direct_sends=False) as src,
        Sidecar(b.rank, nats_url) as dst,
    ):
        small = np.arange(256, dtype=np.float32)  # inline: one `put` carries the bytes
        big = torch.arange(2 * 1024 * 1024 // 4, dtype=torch.float32)  # reserve, write, send
        await src.send(small, "small", [[b.rank]])
        await src.send(big, "big", [[b.rank]])
        np.testing.assert_array_equal(await dst.recv("small"), small)
        assert torch.equal(await dst.recv("big"), big)
        await dst.mark_done("small")
        await dst.mark_done("big")
    await arenas_empty([a.rank, b.rank])
    after = await stats_of([a.rank, b.rank])
    # put + alloc + send on the source, and the destination's two releases (one-way, although this
    # destination never sent to the source); deliver x2 from the source, recv x2 + done x2 on the
    # destination
    assert after[a.rank].socket_requests - before[a.rank].socket_requests >= 5
    assert after[b.rank].socket_requests - before[b.rank].socket_requests >= 6
    assert after[a.rank].sent_by_path.get("shm") == 2


async def test_a_one_way_request_gets_no_answer_and_the_connection_goes_on(sidecars, nats_url, stats_of):
    (a,) = await sidecars(1)
    info = await _info(a.rank, nats_url)
    raw = await Raw.connect(info.local_socket)
    try:
        v = b"stats"
        for body in (b"{not json", StatsRequest(request_id="one-way").model_dump_json().encode()):
            raw.writer.write(REQUEST_HEAD.pack(len(v) | ONE_WAY, len(body), 0, 0) + v + body)
        code, body = await raw.ask("stats", StatsRequest(request_id="answered").model_dump_json().encode())
        # The first reply on the connection answers the third request: the one-way ones got none
        # (the malformed one is only logged).
        assert code == OK and StatsReply.model_validate_json(body).request_id == "answered"
    finally:
        raw.close()
    assert (await stats_of([a.rank]))[a.rank].socket_requests >= 3


async def test_peer_verbs_need_the_peer_secret(sidecars, nats_url, stats_of):
    a, b = await sidecars(2)
    info_a, info_b = await _info(a.rank, nats_url), await _info(b.rank, nats_url)
    deliver = DeliverRequest(
        id="forged",
        chunk_id=0,
        num_chunks=1,
        source_rank=a.rank,
        source_instance=info_a.instance,
        dst_rank=b.rank,
        location=Location(arena=info_a.arena, offset=0, size=64, meta=DataMeta(kind="object", nbytes=64)),
    )
    raw = await Raw.connect(info_b.local_socket)
    try:
        code, body = await raw.ask("deliver", deliver.model_dump_json().encode())
        assert code == 403 and "peer" in ErrorReply.model_validate_json(body).message
        wrong = PeerKey(b"not-the-cluster-secret-at-all")
        hello = LocalHello(
            source_rank=a.rank,
            dst_rank=b.rank,
            mac=wrong.sender_mac(raw.challenge, a.rank, b.rank, "local"),
        )
        code, body = await raw.ask("hello", hello.model_dump_json().encode())
        assert code == 403 and ErrorReply.model_validate_json(body).error == "peer_auth"
        code, _ = await raw.ask("deliver", deliver.model_dump_json().encode())
        assert code == 403
    finally:
        raw.close()
    assert (await stats_of([b.rank]))[b.rank].mailbox_entries == 0


async def test_malformed_frames_close_the_connection_and_bad_puts_leak_nothing(sidecars, nats_url, stats_of):
    (a,) = await sidecars(1)
    info = await _info(a.rank, nats_url)
    raw = await Raw.connect(info.local_socket)
    try:
        raw.writer.write(REQUEST_HEAD.pack(4, MAX_JSON_BYTES + 1, 0, 0) + b"info")
        assert await asyncio.wait_for(raw.reader.read(), 10) == b""  # closed unread
    finally:
        raw.close()
    meta = DataMeta(kind="object", nbytes=100)
    put = SendRequest(
        id="p",
        chunk_id=0,
        dst_ranks=[[a.rank]],
        instance=info.instance,
        location=Location(arena=info.arena, size=100, meta=meta),
        timeout=5,
    )
    raw = await Raw.connect(info.local_socket)
    try:
        code, body = await raw.ask(PUT, put.model_dump_json().encode(), b"x" * 10)  # sizes disagree
        assert code == 400 and ErrorReply.model_validate_json(body).error == "bad_request"
        code, body = await raw.ask("nope", b"{}")
        assert code == 404
        code, body = await raw.ask("info", b"not json")
        assert code == 400
        code, _ = await raw.ask("info", b'{"request_id": "r"}')  # the connection still works
        assert code == 0
    finally:
        raw.close()
    stats = (await stats_of([a.rank]))[a.rank]
    assert stats.used_bytes == 0 and stats.pending_allocs == 0


async def test_a_put_to_an_unknown_rank_frees_its_bytes(sidecars, nats_url, stats_of):
    (a,) = await sidecars(1)
    info = await _info(a.rank, nats_url)
    channel = LocalChannel(Path(info.local_socket))
    meta = DataMeta(kind="object", nbytes=8)
    put = SendRequest(
        id="u",
        chunk_id=0,
        dst_ranks=[[9999]],
        instance=info.instance,
        location=Location(arena=info.arena, size=8, meta=meta),
        timeout=5,
    )
    try:
        with pytest.raises(LocalErrorReply) as err:
            await channel.call(PUT, put, SidecarAck, 10, b"12345678")
        assert err.value.error.error == "unreachable"
    finally:
        channel.close()
    stats = (await stats_of([a.rank]))[a.rank]
    assert stats.used_bytes == 0 and stats.pending_allocs == 0


async def test_client_falls_back_to_nats_when_the_socket_is_gone(sidecars, nats_url):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await src.send(1, "before", [[b.rank]])
        assert await dst.recv("before") == 1
        info = await src.info()
        for p in Path(info.local_socket).parent.iterdir():  # an operator's cleanup removed the socket
            p.unlink()
        async with Sidecar(a.rank, nats_url) as fresh:  # finds no socket to connect to
            await fresh.send(2, "after", [[b.rank]])  # over NATS
        assert await dst.recv("after") == 2
        await dst.mark_done("before")
        await dst.mark_done("after")


async def test_a_put_waits_for_room_then_fails_or_proceeds_and_leaks_nothing(
    sidecars, nats_url, arenas_empty
):
    (a,) = await sidecars(1, arena_bytes=4 * 1024 * 1024)
    (b,) = await sidecars(1)
    # Through the producer's own server (no direct sends): the room waited for is in its arena.
    async with Sidecar(a.rank, nats_url, direct_sends=False) as src, Sidecar(b.rank, nats_url) as dst:
        filler = torch.zeros(3 * 1024 * 1024 // 4 + 1024)  # 3 MiB + 4 KiB: reserved, then written
        small = torch.ones(1024 * 1024 // 4)  # 1 MiB: one put
        await src.send(filler, "fill", [[b.rank]])
        with pytest.raises(MemoryPressure, match="no room"):
            await src.send(small, "p-fail", [[b.rank]], timeout=0.5)
        blocked = asyncio.create_task(src.send(small, "p-wait", [[b.rank]], timeout=20))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        await dst.recv("fill", timeout=5)
        await dst.mark_done("fill")
        await blocked  # room freed: the waiting put proceeds
        assert torch.equal(await dst.recv("p-wait", timeout=5), small)
        await dst.mark_done("p-wait")
    await arenas_empty([a.rank, b.rank])


async def test_mark_done_without_waiting_frees_and_never_raises(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        for k in range(3):
            await src.send(torch.full((1024,), float(k)), f"nw-{k}", [[b.rank]])
            got = await dst.recv(f"nw-{k}", copy=True)
            await dst.mark_done(f"nw-{k}", wait=False)  # written, not answered
            assert torch.equal(got, torch.full((1024,), float(k)))
        # An unknown id: the server logs it; the caller, who did not wait, gets nothing raised.
        await dst.mark_done("never-sent", wait=False)
        with pytest.raises(SidecarError):
            await dst.mark_done("never-sent")  # the waited form still says so
    await arenas_empty([a.rank, b.rank])
    stats = (await stats_of([b.rank]))[b.rank]
    assert stats.mailbox_entries == 0
