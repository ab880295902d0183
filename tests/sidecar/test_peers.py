"""The sidecar's trust boundary towards peers: the TCP data path and the peer-facing bus verbs.

Real sidecar server processes; the TCP tests speak the wire protocol by hand over real sockets,
as an attacker (or a misconfigured peer) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
import time
from pathlib import Path
from typing import TypeVar

import nats
import pytest
from pydantic import BaseModel
from tests.support.processes import ServiceProcess
from tests.support.sidecars import SIDECAR_RANKS, TORCHLESS_SERVER, MiB, SidecarProcess, peer_secret

from cornserve.bus.micro import ServiceErrorReply, request
from cornserve.bus.sidecar import (
    DataMeta,
    DeliverRequest,
    InfoReply,
    InfoRequest,
    Location,
    SidecarAck,
    TcpAck,
    TcpChallenge,
    TcpHeader,
    TcpHello,
    TcpProof,
    TcpSent,
)
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.sidecar import Sidecar
from cornserve.sidecar.arena import arena_name
from cornserve.sidecar.peerauth import PeerKey, new_nonce
from cornserve.sidecar.tcp import HANDSHAKE_TIMEOUT_S, MAX_FRAME_BYTES

LEN = struct.Struct("!I")
M = TypeVar("M", bound=BaseModel)
SOURCE_RANK = 299  # the rank the hand-made peer claims (nothing is sent to it)


class Peer:
    """A hand-driven TCP connection to a sidecar's receiver."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, info: InfoReply) -> Peer:
        return cls(*await asyncio.open_connection(info.tcp_host, info.tcp_port))

    async def send(self, model: BaseModel) -> None:
        body = model.model_dump_json().encode()
        self.writer.write(LEN.pack(len(body)) + body)
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, model: type[M]) -> M:
        (n,) = LEN.unpack(await asyncio.wait_for(self.reader.readexactly(LEN.size), 10))
        return model.model_validate_json(await asyncio.wait_for(self.reader.readexactly(n), 10))

    async def closed_within(self, seconds: float) -> None:
        """The server closes the connection within `seconds` (anything it still sends is discarded)."""
        async with asyncio.timeout(seconds):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionResetError:
                pass  # closed with our bytes unread: a reset is a close too

    async def authenticate(self, dst_rank: int, secret: bytes) -> TcpProof:
        challenge = await self.recv(TcpChallenge)
        assert challenge.rank == dst_rank
        key, mine = PeerKey(secret), new_nonce()
        mac = key.sender_mac(challenge.nonce, SOURCE_RANK, dst_rank, mine)
        await self.send(TcpHello(source_rank=SOURCE_RANK, dst_rank=dst_rank, nonce=mine, mac=mac))
        proof = await self.recv(TcpProof)
        if proof.ok:  # the receiver proved it holds the secret too
            assert key.matches(proof.mac, key.receiver_mac(mine, challenge.nonce, SOURCE_RANK, dst_rank))
        return proof

    def close(self) -> None:
        self.writer.close()


def header(
    dst_rank: int, size: int, *, nbytes: int | None = None, timeout: float = 5.0, id_: str = "x"
) -> TcpHeader:
    return TcpHeader(
        id=id_,
        chunk_id=0,
        source_rank=SOURCE_RANK,
        source_instance="hand-made",
        dst_rank=dst_rank,
        meta=DataMeta(kind="object", nbytes=size if nbytes is None else nbytes),
        size=size,
        timeout=timeout,
    )


async def info_of(nats_url: str, rank: int) -> InfoReply:
    nc = await nats.connect(nats_url)
    try:
        return await request(nc, sidecar_subject(rank, SidecarVerb.INFO), InfoRequest(), InfoReply, 5.0)
    finally:
        await nc.close()


async def assert_nothing_allocated(stats_of, rank: int) -> None:
    stats = (await stats_of([rank]))[rank]
    assert (stats.allocations, stats.used_bytes) == (0, 0)


async def test_unauthenticated_peers_get_nothing_and_are_logged_once(sidecars, nats_url, stats_of):
    (s,) = await sidecars(1, nodes=["node-b"])
    info = await info_of(nats_url, s.rank)

    # A header straight away (no hello): not a hello, closed; nothing reserved for it.
    peer = await Peer.connect(info)
    await peer.recv(TcpChallenge)
    await peer.send(header(s.rank, 8 * MiB))
    await peer.closed_within(HANDSHAKE_TIMEOUT_S + 1)
    peer.close()

    # A hello with a MAC under another secret: refused, closed.
    for _ in range(2):
        peer = await Peer.connect(info)
        proof = await peer.authenticate(s.rank, b"not-the-cluster-secret-at-all")
        assert not proof.ok and "secret" in proof.message
        await peer.closed_within(HANDSHAKE_TIMEOUT_S + 1)
        peer.close()

    # Silence: closed at the handshake deadline.
    peer = await Peer.connect(info)
    await peer.recv(TcpChallenge)
    await peer.closed_within(HANDSHAKE_TIMEOUT_S + 1)
    peer.close()

    await assert_nothing_allocated(stats_of, s.rank)
    # Warned once for this address, however many times it failed.
    assert s.log().count("refused TCP peer 127.0.0.1") == 1, s.log()


async def test_right_secret_but_a_hello_for_another_rank_is_refused(sidecars, nats_url, stats_of):
    (s,) = await sidecars(1, nodes=["node-b"])
    info = await info_of(nats_url, s.rank)
    peer = await Peer.connect(info)
    challenge = await peer.recv(TcpChallenge)
    key, mine, other = PeerKey(peer_secret()), new_nonce(), s.rank + 1
    mac = key.sender_mac(challenge.nonce, SOURCE_RANK, other, mine)
    await peer.send(TcpHello(source_rank=SOURCE_RANK, dst_rank=other, nonce=mine, mac=mac))
    assert not (await peer.recv(TcpProof)).ok
    await peer.closed_within(HANDSHAKE_TIMEOUT_S + 1)
    peer.close()
    await assert_nothing_allocated(stats_of, s.rank)


async def test_oversized_header_frame_is_refused_before_it_is_read(sidecars, nats_url, stats_of):
    (s,) = await sidecars(1, nodes=["node-b"])
    info = await info_of(nats_url, s.rank)
    peer = await Peer.connect(info)
    assert (await peer.authenticate(s.rank, peer_secret())).ok
    await peer.send_raw(LEN.pack(MAX_FRAME_BYTES + 1) + b"{" * 1024)
    await peer.closed_within(HANDSHAKE_TIMEOUT_S + 1)
    peer.close()
    await assert_nothing_allocated(stats_of, s.rank)


async def test_header_whose_nbytes_exceed_its_chunk_is_refused(sidecars, nats_url, stats_of):
    (s,) = await sidecars(1, nodes=["node-b"])
    info = await info_of(nats_url, s.rank)
    peer = await Peer.connect(info)
    assert (await peer.authenticate(s.rank, peer_secret())).ok
    await peer.send(header(s.rank, 1024, nbytes=1024 * 1024))
    ack = await peer.recv(TcpAck)
    assert (ack.ok, ack.error) == (False, "bad_request") and "nbytes" in ack.message
    await peer.closed_within(5)
    peer.close()
    await assert_nothing_allocated(stats_of, s.rank)


@pytest.mark.parametrize("sent", [512, 2048], ids=["short", "long"])
async def test_payload_of_the_wrong_length_frees_its_block(sidecars, nats_url, stats_of, arenas_empty, sent):
    (s,) = await sidecars(1, nodes=["node-b"])
    info = await info_of(nats_url, s.rank)
    peer = await Peer.connect(info)
    assert (await peer.authenticate(s.rank, peer_secret())).ok
    await peer.send(header(s.rank, 1024, id_="wrong-length"))
    assert (await peer.recv(TcpAck)).ok
    assert (await stats_of([s.rank]))[s.rank].allocations == 1  # reserved for it
    if sent > 1024:
        # The server may close on the bytes past the 1024 it reserved before our TcpSent is written.
        with contextlib.suppress(ConnectionError):
            await peer.send_raw(b"\x01" * sent)
            await peer.send(TcpSent(nbytes=sent))
    else:
        await peer.send_raw(b"\x01" * sent)
        peer.writer.write_eof()  # short: the peer gives up half-way
    await peer.closed_within(5)
    peer.close()
    await arenas_empty([s.rank])
    assert (await stats_of([s.rank]))[s.rank].mailbox_entries == 0  # nothing landed


async def test_a_stalled_peer_loses_its_reservation_at_the_capped_deadline(
    sidecars, nats_url, stats_of, arenas_empty, monkeypatch
):
    monkeypatch.setenv("CORNSERVE_TCP_MAX_TIMEOUT_S", "2")  # the server's cap on a header's timeout
    (s,) = await sidecars(1, nodes=["node-b"])
    info = await info_of(nats_url, s.rank)
    peer = await Peer.connect(info)
    assert (await peer.authenticate(s.rank, peer_secret())).ok
    await peer.send(header(s.rank, 4 * MiB, timeout=600.0, id_="stalled"))
    assert (await peer.recv(TcpAck)).ok
    started = time.monotonic()
    await peer.send_raw(b"\x02" * 4096)  # a trickle, then nothing
    assert (await stats_of([s.rank]))[s.rank].used_bytes >= 4 * MiB
    await peer.closed_within(2 + 1 + 1)  # the cap, the ack grace, 1 s slack; not the 600 s asked for
    await arenas_empty([s.rank], timeout=1.0)
    assert time.monotonic() - started < 2 + 1 + 1 + 1
    peer.close()
    # The server still serves authenticated peers afterwards.
    peer = await Peer.connect(info)
    assert (await peer.authenticate(s.rank, peer_secret())).ok
    peer.close()


async def test_cross_node_transfer_between_sidecars_with_different_secrets_fails_typed(
    sidecars, nats_url, tmp_path, arenas_empty
):
    from cornserve.runtime.secrets import new_token, write_secret_file
    from cornserve.sidecar.errors import PeerAuthFailed

    (a,) = await sidecars(1, nodes=["node-a"])
    other = write_secret_file(tmp_path / "other-secret", new_token())
    b = SidecarProcess.start(SIDECAR_RANKS.next(), nats_url, tmp_path, node="node-b", peer_secret=other)
    try:
        await b.wait_ready()
        async with Sidecar(a.rank, nats_url) as src:
            with pytest.raises(PeerAuthFailed, match="secret"):
                await src.send({"k": 1}, "wrong-secret", [[b.rank]], timeout=5)
        await arenas_empty([a.rank, b.rank])
    finally:
        b.stop()
    assert "Traceback" not in b.log()


async def deliver(nats_url: str, rank: int, msg: DeliverRequest) -> SidecarAck:
    nc = await nats.connect(nats_url)
    try:
        return await request(nc, sidecar_subject(rank, SidecarVerb.DELIVER), msg, SidecarAck, 5.0)
    finally:
        await nc.close()


async def test_forged_deliver_cannot_point_at_or_free_anothers_bytes(
    sidecars, nats_url, stats_of, arenas_empty
):
    a, b = await sidecars(2, nodes=["node-a", "node-b"])
    b_info = await info_of(nats_url, b.rank)
    a_info = await info_of(nats_url, a.rank)
    payload = {"intact": list(range(100))}
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await src.send(payload, "real", [[b.rank]])  # over TCP: its bytes now live in b's arena
        assert (await stats_of([b.rank]))[b.rank].allocations == 1

        meta = DataMeta(kind="object", nbytes=64)
        forged = {
            "own arena": Location(arena=b_info.arena, offset=0, size=64, meta=meta, node="node-b"),
            "other's arena": Location(arena=a_info.arena, offset=0, size=64, meta=meta, node="node-b"),
            "nbytes past size": Location(
                arena=arena_name("node-b", a.rank, a_info.instance), offset=0, size=64,
                meta=DataMeta(kind="object", nbytes=4096), node="node-b",
            ),
            "negative offset": Location.model_construct(
                transport="shm", rank=a.rank, arena=b_info.arena, offset=-64, size=64, meta=meta,
                cuda_handle="", device=0, node="node-b",
            ),
        }  # fmt: skip
        for why, loc in forged.items():
            msg = DeliverRequest(
                id=f"forged-{why}",
                chunk_id=0,
                source_rank=a.rank,
                source_instance=a_info.instance,
                dst_rank=b.rank,
                location=loc,
            )
            with pytest.raises(ServiceErrorReply) as err:
                await deliver(nats_url, b.rank, msg)
            assert err.value.error.error == "bad_request", why
        # Claiming to be the destination itself, or addressed to another rank: refused too.
        ok_loc = forged["own arena"]
        for fields in ({"source_rank": b.rank}, {"dst_rank": a.rank}):
            base = {"id": "forged-ranks", "chunk_id": 0, "source_rank": a.rank, "source_instance": "x"}
            msg = DeliverRequest(**{**base, "dst_rank": b.rank, "location": ok_loc, **fields})
            with pytest.raises(ServiceErrorReply):
                await deliver(nats_url, b.rank, msg)

        # The server still serves, and the real transfer's bytes are untouched.
        assert await dst.recv("real", timeout=5) == payload
        await dst.mark_done("real")
    await arenas_empty([a.rank, b.rank])
    assert (await stats_of([b.rank]))[b.rank].mailbox_entries == 0


def start_without_secret(rank: int, nats_url: str, log_dir: Path, node: str) -> ServiceProcess:
    """A sidecar given no --peer-secret-file (the helper always gives one)."""
    cmd = [
        sys.executable,
        "-c",
        TORCHLESS_SERVER,
        "--rank",
        str(rank),
        "--node",
        node,
        "--nats-url",
        nats_url,
    ]
    cmd += ["--arena-bytes", str(16 * MiB)]
    return ServiceProcess.start(f"sidecar-{rank}", cmd, log_dir)


async def test_without_a_secret_same_node_works_and_cross_node_fails_typed(
    sidecars, nats_url, tmp_path, arenas_empty
):
    from cornserve.sidecar.errors import PeerAuthFailed

    (a,) = await sidecars(1, nodes=["node-a"])
    ranks = [SIDECAR_RANKS.next(), SIDECAR_RANKS.next()]  # started by hand, without a secret
    bare = [start_without_secret(r, nats_url, tmp_path, "node-b") for r in ranks]
    try:
        for r, proc in zip(ranks, bare, strict=True):
            await SidecarProcess(r, "node-b", nats_url, proc).wait_ready()
        assert (await info_of(nats_url, ranks[0])).tcp_port == 0  # not listening at all
        async with Sidecar(ranks[0], nats_url) as n1, Sidecar(ranks[1], nats_url) as n2:
            await n1.send({"same": "node"}, "bare-shm", [[ranks[1]]], timeout=5)
            assert await n2.recv("bare-shm", timeout=5) == {"same": "node"}
            await n2.mark_done("bare-shm")
            with pytest.raises(PeerAuthFailed, match="no peer secret"):
                await n1.send({"k": 1}, "bare-out", [[a.rank]], timeout=5)
        async with Sidecar(a.rank, nats_url) as src:
            with pytest.raises(PeerAuthFailed, match="accepts no cross-node transfers"):
                await src.send({"k": 1}, "bare-in", [[ranks[0]]], timeout=5)
        await arenas_empty([a.rank, *ranks])
    finally:
        for proc in bare:
            proc.stop()
    for proc in bare:
        log = proc.log()
        assert "no peer secret configured" in log and "Traceback" not in log, log


async def test_a_secret_file_others_can_read_stops_the_server_at_start(nats_url, tmp_path):
    from cornserve.runtime.secrets import new_token, write_secret_file

    loose = write_secret_file(tmp_path / "loose-secret", new_token())
    loose.chmod(0o644)
    s = SidecarProcess.start(SIDECAR_RANKS.next(), nats_url, tmp_path, node="node-b", peer_secret=loose)
    assert s.service.wait_exit(60) != 0
    assert "chmod 600" in s.log() and "Traceback" not in s.log(), s.log()
