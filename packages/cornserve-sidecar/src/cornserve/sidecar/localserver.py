"""The server's same-node control socket: the NATS endpoints again, without the broker hop.

Clients of this node and peer servers of this node connect to a UNIX socket (see
`cornserve.bus.sidecar_local` for the framing, `localsocket` for where it lives). Each request is
parsed by the same model and answered by the same handler as on NATS, so both paths behave alike;
the local path adds ``put`` (a send whose bytes ride along: one message instead of ``alloc`` then
``send``). Client verbs are open to every connection; peer verbs (deliver, release, notice) only to
a connection that proved the cluster's peer secret with a ``hello`` — the same split as the NATS
permissions, where executors may not publish peer verbs.

Input is untrusted: sizes are checked before reading, a malformed frame closes the connection, an
invalid body is answered ``bad_request``. Requests of one connection run one at a time (a waiting
``recv`` holds its connection; clients open more); all of them are cancelled at stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cornserve.bus.error_codec import describe_invalid, request_id_of
from cornserve.bus.micro import ServiceFault
from cornserve.bus.schemas import ErrorReply
from cornserve.bus.sidecar import SendRequest, SidecarAck
from cornserve.bus.sidecar_local import (
    CHALLENGE_BYTES,
    HELLO,
    MAX_INLINE_BYTES,
    MAX_JSON_BYTES,
    MAX_TRACE_BYTES,
    MAX_VERB_BYTES,
    OK,
    ONE_WAY,
    PUT,
    REPLY_HEAD,
    REQUEST_HEAD,
    LocalHello,
)
from cornserve.runtime.tracing import TRACEPARENT, SpanKind, extract_context, span
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.identity import ServerIdentity
from cornserve.sidecar.peerauth import PeerKey, new_nonce

logger = logging.getLogger("cornserve.sidecar.server")

MAX_CONNECTIONS = 1024
"""More connections at once are closed at accept (a local process cannot exhaust our descriptors)."""

Handler = Callable[[BaseModel], Awaitable[BaseModel]]


@dataclass(frozen=True)
class Route:
    """One verb: its request model, its handler, and whether only authenticated peers may call it."""

    model: type[BaseModel]
    handler: Handler
    peer_only: bool = False


class FrameError(Exception):
    """The peer broke the framing (size over a cap, unknown encoding): the connection is closed."""


class LocalEndpoint:
    """Serves the routes on a UNIX socket at ``path`` (its directory already owner-only)."""

    def __init__(
        self,
        me: ServerIdentity,
        memory: ArenaMemory,
        routes: dict[str, Route],
        send: Callable[[SendRequest], Awaitable[SidecarAck]],
        peer_key: PeerKey | None,
    ) -> None:
        self._me = me
        self._memory = memory
        self._routes = routes
        self._send = send
        self._peer_key = peer_key
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.path: Path | None = None
        self.requests = 0
        """Requests answered (reported in stats as ``socket_requests``)."""

    async def start(self, path: Path) -> None:
        """Listen on ``path`` with mode 0600 (bound under a umask that leaves no window)."""
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.path = path

    async def close(self) -> None:
        """Stop accepting and cancel every connection's work."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._conns)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Served in a task of our own: asyncio's stream callback logs the cancellation of its task at stop.
        if len(self._conns) >= MAX_CONNECTIONS:
            logger.warning("local socket: %d connections open; refusing one more", len(self._conns))
            writer.close()
            return
        task = asyncio.create_task(self._connection(reader, writer))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (FrameError, asyncio.IncompleteReadError, ConnectionError) as exc:
            logger.debug("local connection closed: %r", exc)
        except Exception:
            logger.exception("local connection failed")
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        challenge = new_nonce()
        assert len(challenge) == CHALLENGE_BYTES
        writer.write(challenge.encode())
        peer: int | None = None  # the authenticated peer rank of this connection
        while True:
            head = await reader.readexactly(REQUEST_HEAD.size)
            verb_len, json_len, payload_len, trace_len = REQUEST_HEAD.unpack(head)
            one_way = bool(verb_len & ONE_WAY)
            verb_len &= ~ONE_WAY
            if (
                verb_len > MAX_VERB_BYTES
                or json_len > MAX_JSON_BYTES
                or payload_len > MAX_INLINE_BYTES
                or trace_len > MAX_TRACE_BYTES
            ):
                raise FrameError(f"frame over the caps ({verb_len}, {json_len}, {payload_len}, {trace_len})")
            rest = await reader.readexactly(verb_len + trace_len + json_len)  # one read: fewer loop turns
            try:
                verb = rest[:verb_len].decode("ascii")
                trace = rest[verb_len : verb_len + trace_len].decode("ascii")
            except UnicodeDecodeError:
                raise FrameError("verb or trace context is not ASCII") from None
            body = rest[verb_len + trace_len :]
            if payload_len and verb != PUT:
                raise FrameError(f"verb {verb!r} carries no payload")
            if verb == HELLO:
                code, reply, peer = self._hello(body, challenge)
            else:
                # The caller's span continues here, as a NATS request's traceparent header does.
                parent = extract_context({TRACEPARENT: trace}) if trace else None
                if parent is None:
                    code, reply = await self._dispatch(verb, body, reader, payload_len, peer)
                else:
                    attributes = {"messaging.system": "unix", "messaging.destination.name": verb}
                    with span(f"sidecar.{verb}", kind=SpanKind.SERVER, parent=parent, attributes=attributes):
                        code, reply = await self._dispatch(verb, body, reader, payload_len, peer)
            self.requests += 1
            if one_way:  # nobody waits for this answer: a failure is only ours to report
                if code != OK:
                    logger.warning("local socket: one-way %s failed (%d): %s", verb, code, reply[:300])
                continue
            writer.write(REPLY_HEAD.pack(code, len(reply)) + reply)
            await writer.drain()

    async def _dispatch(
        self, verb: str, body: bytes, reader: asyncio.StreamReader, payload_len: int, peer: int | None
    ) -> tuple[int, bytes]:
        if verb == PUT:
            return await self._put(body, reader, payload_len)
        return await self._call(verb, body, peer)

    def _hello(self, body: bytes, challenge: str) -> tuple[int, bytes, int | None]:
        try:
            hello = LocalHello.model_validate_json(body)
        except ValidationError as exc:
            return *_error(request_id_of(body), 400, "bad_request", describe_invalid(exc)), None
        key = self._peer_key
        expected = "" if key is None else key.sender_mac(challenge, hello.source_rank, self._me.rank, "local")
        if key is None or hello.dst_rank != self._me.rank or not key.matches(hello.mac, expected):
            logger.warning("local socket: peer hello from rank %d refused", hello.source_rank)
            return *_error(hello.request_id, 403, "peer_auth", "peer authentication failed"), None
        return OK, self._me.ack(hello.request_id).model_dump_json().encode(), hello.source_rank

    async def _call(self, verb: str, body: bytes, peer: int | None) -> tuple[int, bytes]:
        route = self._routes.get(verb)
        if route is None:
            return _error(request_id_of(body), 404, "bad_request", f"unknown verb {verb!r}")
        if route.peer_only and peer is None:
            return _error(request_id_of(body), 403, "bad_request", f"verb {verb!r} is for peer sidecars")
        try:
            parsed = route.model.model_validate_json(body)
        except ValidationError as exc:
            return _error(
                request_id_of(body), 400, "bad_request", "invalid request: " + describe_invalid(exc)
            )
        return await _answer(route.handler(parsed), str(getattr(parsed, "request_id", "")), verb)

    async def _put(self, body: bytes, reader: asyncio.StreamReader, size: int) -> tuple[int, bytes]:
        """A send with its bytes: reserve, read them straight in, then send as usual."""
        try:
            req = SendRequest.model_validate_json(body)
        except ValidationError as exc:
            await reader.readexactly(size)  # keep the framing
            return _error(
                request_id_of(body), 400, "bad_request", "invalid request: " + describe_invalid(exc)
            )
        loc = req.location
        if loc.transport != "shm" or loc.size != size or loc.meta.nbytes != size:
            await reader.readexactly(size)
            return _error(req.request_id, 400, "bad_request", "put: location size, meta and payload differ")
        try:
            reservation = await self._memory.reserve(size, req.timeout)
        except ServiceFault as fault:
            await reader.readexactly(size)
            return _error(req.request_id, fault.code, fault.error, fault.message, fault.details)
        offset = reservation.offset
        try:
            if size:
                view = self._memory.arena.view
                view[offset : offset + size] = await reader.readexactly(size)
        except BaseException:
            self._memory.give_back(reservation)
            raise
        located = req.model_copy(
            update={
                "instance": self._me.instance,
                "location": loc.model_copy(update={"arena": self._memory.arena.name, "offset": offset}),
            }
        )
        try:
            return await _answer(self._send(located), req.request_id, PUT)
        finally:
            # Gives back only this put's own reservation, if the send failed before taking it: once
            # taken, the block may already be released and its offset reserved by another request.
            self._memory.give_back(reservation)


async def _answer(work: Awaitable[BaseModel], request_id: str, verb: str) -> tuple[int, bytes]:
    try:
        reply = await work
    except ServiceFault as fault:
        return _error(request_id, fault.code, fault.error, fault.message, fault.details)
    except Exception as exc:
        logger.exception("local handler for %s failed", verb)
        return _error(request_id, 500, "internal", f"{type(exc).__name__}: {exc}")
    return OK, reply.model_dump_json().encode()


def _error(
    request_id: str, code: int, kind: str, message: str, details: dict[str, object] | None = None
) -> tuple[int, bytes]:
    body = ErrorReply(request_id=request_id, error=kind, message=message, details=dict(details or {}))
    return code, body.model_dump_json().encode()
