"""Framing and socket setup for the cross-node data path between sidecar servers.

A connection is: challenge -> hello (the sender's HMAC answer and its own nonce) -> proof (the
receiver's answer) -> header frame -> receiver allocates and answers ready -> raw payload bytes
sent straight from the source arena and received straight into the destination arena
(``sock_recv_into`` on a memoryview slice: no intermediate Python buffers) -> sent frame (the
payload's length) -> receiver answers done.

Nothing is allocated before the peer proved it holds the cluster's secret (``peerauth``), every
frame is capped (:data:`MAX_FRAME_BYTES`), the handshake has its own short deadline and a transfer
is bounded by the sender's timeout capped at the receiver's ``max_timeout``: a peer that stops
sending loses its reservation at that deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cornserve.bus.sidecar import TcpAck, TcpChallenge, TcpHeader, TcpHello, TcpProof, TcpSent
from cornserve.sidecar.peerauth import PeerKey, new_nonce
from cornserve.sidecar.tasks import BackgroundTasks

SOCKET_BUFFER_BYTES = 16 * 1024 * 1024
"""Requested SO_SNDBUF/SO_RCVBUF; the kernel caps it at net.core.[rw]mem_max."""

RECV_CHUNK_BYTES = 8 * 1024 * 1024
"""Largest single recv_into; bounded so progress is steady and the loop stays responsive."""

MAX_FRAME_BYTES = 64 * 1024
"""Largest control frame (challenge, hello, header, acks); a header is a few hundred bytes."""
HANDSHAKE_TIMEOUT_S = 5.0
"""From accept to a complete header: challenge, hello, proof and header must all fit in it."""
MAX_PENDING_HANDSHAKES = 256
"""Connections still authenticating at once; more are closed at accept (a connection flood)."""
ACCEPT_BACKOFF_S = 0.1
"""Pause after a failed accept (e.g. out of file descriptors) before accepting again."""
WARNED_ADDRESSES_MAX = 4096
"""Addresses remembered for 'refused peer' warnings (then the memory starts over)."""
ACK_GRACE_S = 1.0
_LEN = struct.Struct("!I")
logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class ProtocolError(Exception):
    """The peer broke the framing (closed early, oversized frame, a frame that is not the expected model)."""


def tune(sock: socket.socket) -> None:
    """Big buffers, no Nagle, non-blocking (driven by the event loop)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


async def recv_exactly_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from ``sock``."""
    loop = asyncio.get_running_loop()
    pos, total = 0, len(view)
    while pos < total:
        n = await loop.sock_recv_into(sock, view[pos : min(total, pos + RECV_CHUNK_BYTES)])
        if n == 0:
            raise ProtocolError(f"peer closed the connection after {pos} of {total} bytes")
        pos += n


async def send_frame(sock: socket.socket, model: BaseModel) -> None:
    """Length-prefixed JSON frame."""
    body = model.model_dump_json().encode()
    await asyncio.get_running_loop().sock_sendall(sock, _LEN.pack(len(body)) + body)


async def recv_frame(sock: socket.socket, model: type[M]) -> M:
    """Read one length-prefixed JSON frame as ``model``."""
    head = bytearray(_LEN.size)
    await recv_exactly_into(sock, memoryview(head))
    (length,) = _LEN.unpack(head)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    body = bytearray(length)
    await recv_exactly_into(sock, memoryview(body))
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise ProtocolError(f"malformed {model.__name__} frame ({exc.error_count()} errors)") from None


class TransferRefused(Exception):
    """The receiving server answered with an error (``error`` is a sidecar error kind)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class Refusal(Exception):
    """Raised by a receiver callback to refuse a transfer with a typed error."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


Allocate = Callable[[TcpHeader], Awaitable[tuple[int, memoryview]]]
"""Reserve room for the header's payload (waiting up to its capped timeout): (owner's token, destination view)."""
Land = Callable[[TcpHeader, int], Awaitable[None]]
"""The payload is in place at the reservation ``token``: take ownership of it."""
Abandon = Callable[[int], None]
"""The transfer failed after allocation: give reservation ``token`` back."""


@dataclass(frozen=True)
class ReceiverLimits:
    """What a peer's header may ask of this receiver."""

    rank: int
    """This server's rank: a hello or header for another rank is refused."""
    max_timeout: float
    """Cap on the timeout a header asks for (how long a reservation may wait for its bytes)."""


class TcpReceiver:
    """Accepts transfers from authenticated peer servers; bytes go straight into views the owner hands out."""

    def __init__(
        self,
        host: str,
        port: int,
        key: PeerKey,
        limits: ReceiverLimits,
        allocate: Allocate,
        land: Land,
        abandon: Abandon,
    ) -> None:
        self.host = host
        self.port = port
        self._key = key
        self._limits = limits
        self._allocate = allocate
        self._land = land
        self._abandon = abandon
        self._listener: socket.socket | None = None
        self._tasks = BackgroundTasks(logger, "TCP receiver task")
        self._handshaking = 0
        self._warned: set[str] = set()

    def start(self) -> int:
        """Bind and start accepting; returns the bound port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        sock.bind((self.host, self.port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self._listener = sock
        self._tasks.spawn(self._accept_forever(sock))
        return self.port

    async def close(self) -> None:
        """Stop accepting and cancel transfers in progress."""
        if self._listener is not None:
            self._listener.close()
        await self._tasks.close()

    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except OSError as exc:
                # Out of file descriptors, a connection reset before accept, ...: keep serving.
                logger.warning("TCP accept failed: %s; accepting again in %.1fs", exc, ACCEPT_BACKOFF_S)
                await asyncio.sleep(ACCEPT_BACKOFF_S)
                continue
            host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            if self._handshaking >= MAX_PENDING_HANDSHAKES:
                self._refused(host, f"{MAX_PENDING_HANDSHAKES} connections are already authenticating")
                conn.close()
                continue
            tune(conn)
            self._tasks.spawn(self._receive(conn, host))

    def _refused(self, host: str, why: str) -> None:
        """Log a refused peer at warning once per address (a scanner or flood must not flood the log)."""
        if host in self._warned:
            logger.debug("refused TCP peer %s: %s", host, why)
            return
        if len(self._warned) >= WARNED_ADDRESSES_MAX:
            self._warned.clear()
        self._warned.add(host)
        logger.warning(
            "refused TCP peer %s: %s (further refusals from it are logged at debug level)", host, why
        )

    async def _handshake(self, conn: socket.socket, host: str) -> tuple[TcpHello, TcpHeader] | None:
        """Authenticate the peer and read its header, within :data:`HANDSHAKE_TIMEOUT_S`; None: refused."""
        self._handshaking += 1
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                challenge = new_nonce()
                await send_frame(conn, TcpChallenge(nonce=challenge, rank=self._limits.rank))
                hello = await recv_frame(conn, TcpHello)
                expected = self._key.sender_mac(challenge, hello.source_rank, hello.dst_rank, hello.nonce)
                if not self._key.matches(hello.mac, expected):
                    self._refused(host, f"wrong HMAC answer (claims rank {hello.source_rank})")
                    message = "peer authentication failed: the sidecars' peer secrets differ"
                    await send_frame(conn, TcpProof(ok=False, message=message))
                    return None
                if hello.dst_rank != self._limits.rank:
                    self._refused(host, f"hello for rank {hello.dst_rank}, this is {self._limits.rank}")
                    message = f"this is rank {self._limits.rank}, not {hello.dst_rank}"
                    await send_frame(conn, TcpProof(ok=False, message=message))
                    return None
                mac = self._key.receiver_mac(hello.nonce, challenge, hello.source_rank, hello.dst_rank)
                await send_frame(conn, TcpProof(ok=True, mac=mac))
                header = await recv_frame(conn, TcpHeader)
        except (ProtocolError, OSError, TimeoutError) as exc:
            self._refused(
                host, f"no valid handshake within {HANDSHAKE_TIMEOUT_S}s: {str(exc) or type(exc).__name__}"
            )
            return None
        finally:
            self._handshaking -= 1
        return hello, header

    def _checked(self, hello: TcpHello, header: TcpHeader) -> TcpHeader:
        """The header with its timeout capped; a header that contradicts the hello is refused."""
        if (header.source_rank, header.dst_rank) != (hello.source_rank, hello.dst_rank):
            raise Refusal(
                "bad_request",
                f"header for ranks {header.source_rank}->{header.dst_rank} after a hello for "
                f"{hello.source_rank}->{hello.dst_rank}",
            )
        if header.meta.nbytes > header.size:
            raise Refusal(
                "bad_request", f"meta.nbytes {header.meta.nbytes} exceeds the chunk size {header.size}"
            )
        return header.model_copy(update={"timeout": min(header.timeout, self._limits.max_timeout)})

    async def _receive(self, conn: socket.socket, host: str) -> None:
        """One connection: handshake -> header -> allocate -> ready -> payload -> sent -> land -> done."""
        token: int | None = None
        try:
            shaken = await self._handshake(conn, host)
            if shaken is None:
                return
            hello, header = shaken
            try:
                header = self._checked(hello, header)
                # The owner's allocate() answers by header.timeout; the grace lets that answer go out.
                # A peer that stops sending hits this deadline too, and the finally frees its room.
                async with asyncio.timeout(header.timeout + ACK_GRACE_S):
                    token, view = await self._allocate(header)
                    await send_frame(conn, TcpAck(ok=True))
                    await recv_exactly_into(conn, view)
                    del view
                    sent = await recv_frame(conn, TcpSent)
                    if sent.nbytes != header.size:
                        raise Refusal(
                            "bad_request", f"sent {sent.nbytes} bytes, the header announced {header.size}"
                        )
                    await self._land(header, token)
                    token = None  # owned by the receiver's owner now
                    await send_frame(conn, TcpAck(ok=True))
            except Refusal as r:
                # The sender gets the typed reason (memory pressure is routine: not a warning here).
                logger.info("TCP transfer from %s (rank %d) refused: %s", host, hello.source_rank, r.message)
                async with asyncio.timeout(ACK_GRACE_S):
                    await send_frame(conn, TcpAck(ok=False, error=r.error, message=r.message))
        except (ProtocolError, OSError, TimeoutError) as exc:
            logger.warning("TCP transfer from %s failed: %s", host, str(exc) or type(exc).__name__)
        finally:
            if token is not None:
                self._abandon(token)
            conn.close()


async def push(
    host: str, port: int, key: PeerKey, header: TcpHeader, payload: memoryview, timeout: float
) -> None:
    """Send one chunk to a peer's :class:`TcpReceiver`, straight from ``payload``.

    Raises OSError (connect/IO), :class:`ProtocolError`, TimeoutError or :class:`TransferRefused`
    (``peer_auth`` when the handshake fails either way).
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    src, dst = header.source_rank, header.dst_rank
    try:
        tune(sock)
        # The receiver works to header.timeout; the grace lets its typed refusal (e.g. memory
        # pressure at its deadline) reach us instead of our own timeout firing first.
        async with asyncio.timeout(timeout + 2 * ACK_GRACE_S):
            await loop.sock_connect(sock, (host, port))
            challenge = await recv_frame(sock, TcpChallenge)
            if challenge.rank != dst:
                raise TransferRefused("peer_auth", f"{host}:{port} is rank {challenge.rank}, not {dst}")
            mine = new_nonce()
            mac = key.sender_mac(challenge.nonce, src, dst, mine)
            await send_frame(sock, TcpHello(source_rank=src, dst_rank=dst, nonce=mine, mac=mac))
            proof = await recv_frame(sock, TcpProof)
            if not proof.ok:
                raise TransferRefused("peer_auth", proof.message)
            if not key.matches(proof.mac, key.receiver_mac(mine, challenge.nonce, src, dst)):
                raise TransferRefused(
                    "peer_auth", f"{host}:{port} did not prove it holds the cluster's peer secret"
                )
            await send_frame(sock, header)
            ready = await recv_frame(sock, TcpAck)
            if not ready.ok:
                raise TransferRefused(ready.error, ready.message)
            await loop.sock_sendall(sock, payload)
            await send_frame(sock, TcpSent(nbytes=len(payload)))
            done = await recv_frame(sock, TcpAck)
            if not done.ok:
                raise TransferRefused(done.error, done.message)
    finally:
        sock.close()
