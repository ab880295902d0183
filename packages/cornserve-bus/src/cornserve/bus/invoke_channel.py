"""Wire format of an executor's invocation channel: framed unary invocations over one TCP connection.

Why: a dispatcher -> executor HTTP request costs the aiohttp client and server about 0.2 ms of CPU
each side (request and response objects, header parsing, a connection pool round), which on a
two-stage graph was ~40% of each executor's CPU. The channel carries the same invocation body and
the same answer (status and JSON body) in length-prefixed frames, many invocations in flight on one
connection, matched by a request id. Streams, health, info and metrics stay on HTTP, and an
executor that advertises no channel (an older one, the LLM executor, vLLM) is called over HTTP.

Framing, both directions, big-endian: ``FRAME_HEAD`` (length of the rest of the frame, kind,
request id, meta length), the meta (JSON, validated by the kind's pydantic model; empty means
the model's defaults) and the body (raw bytes: the invocation's JSON in a call, the answer's JSON
in a reply). Kinds:

- ``CALL`` (dispatcher -> executor): :class:`CallMeta` (the executor path the HTTP request would
  have had, the caller's W3C trace headers), body: the invocation JSON, exactly the HTTP body.
- ``REPLY`` (executor -> dispatcher): :class:`ReplyMeta` (HTTP status, ``Retry-After``), body: what
  the HTTP response body would have been (the output JSON, or ``{"error": ...}``).
- ``CANCEL`` (dispatcher -> executor): stop the call with this id (what closing an HTTP connection
  does); no reply follows. A reply to an id the caller no longer waits for is dropped.

Everything read from the socket is untrusted: a frame's length is checked against the reader's
limit before its bytes are buffered, meta is validated by its model, and any malformed frame closes
the connection (every call in flight on it fails as a broken connection would).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Final, TypeVar, cast

from pydantic import Field, ValidationError

from cornserve.bus.schemas import WireModel

FRAME_HEAD: Final = struct.Struct("!IBQI")
"""Length of the rest of the frame (kind, id, meta length, meta, body), kind, request id, meta length."""
LENGTH: Final = struct.Struct("!I")
REST_HEAD_BYTES: Final = FRAME_HEAD.size - LENGTH.size
"""Kind, request id and meta length: what the frame length counts before the meta."""

CALL: Final = 1
REPLY: Final = 2
CANCEL: Final = 3
KINDS: Final = frozenset({CALL, REPLY, CANCEL})

DEFAULT_MAX_FRAME_BYTES: Final = 64 << 20
"""Default bound on one frame, both sides (an invocation or output JSON; tensors go through sidecars)."""
MIN_MAX_FRAME_BYTES: Final = 64 << 10
"""No side may be configured below this (a reply with an error text must always fit)."""
MAX_META_BYTES: Final = 8 << 10
"""Meta is a path, a status and trace headers: a longer one is malformed."""
MAX_TRACE_HEADERS: Final = 4


class FrameError(ValueError):
    """A frame that breaks the format or a limit: the connection it came on is closed."""


class CallMeta(WireModel):
    """A call's meta: the request path the HTTP request would have had, and the trace context."""

    path: str = Field(default="/invoke", min_length=1, max_length=256)
    trace: dict[str, str] = Field(default_factory=dict, max_length=MAX_TRACE_HEADERS)
    """W3C trace headers (`traceparent`, `tracestate`) of the caller's span, as HTTP would carry them."""


class ReplyMeta(WireModel):
    """A reply's meta: the HTTP status the answer would have had, and its ``Retry-After`` (429)."""

    status: int = Field(default=200, ge=100, le=599)
    retry_after: str | None = Field(default=None, max_length=32)


class CancelMeta(WireModel):
    """A cancel carries nothing but its request id."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: meta still raw (validate it with the kind's model), body raw."""

    kind: int
    request_id: int
    meta: bytes
    body: bytes


def encode(kind: int, request_id: int, meta: bytes = b"", body: bytes = b"") -> bytes:
    """One frame's bytes."""
    return FRAME_HEAD.pack(REST_HEAD_BYTES + len(meta) + len(body), kind, request_id, len(meta)) + meta + body


def call_meta(path: str, trace: dict[str, str]) -> bytes:
    """A call's meta JSON (empty for the defaults: `/invoke` and no trace)."""
    if path == "/invoke" and not trace:
        return b""
    return CallMeta(path=path, trace=trace).model_dump_json().encode()


def reply_meta(status: int, retry_after: str | None = None) -> bytes:
    """A reply's meta JSON (empty for a plain 200)."""
    if status == 200 and retry_after is None:
        return b""
    return ReplyMeta(status=status, retry_after=retry_after).model_dump_json().encode()


def parse_call(frame: Frame) -> CallMeta:
    """A call frame's meta, validated (FrameError if it is not a CallMeta)."""
    return _meta(CallMeta, frame)


def parse_reply(frame: Frame) -> ReplyMeta:
    """A reply frame's meta, validated (FrameError if it is not a ReplyMeta)."""
    return _meta(ReplyMeta, frame)


_DEFAULT_CALL = CallMeta()
_DEFAULT_REPLY = ReplyMeta()


M = TypeVar("M", bound=WireModel)


def _meta(model: type[M], frame: Frame) -> M:
    if not frame.meta:
        default = _DEFAULT_CALL if model is CallMeta else _DEFAULT_REPLY if model is ReplyMeta else model()
        assert isinstance(default, model)
        return default
    try:
        return model.model_validate_json(frame.meta)
    except ValidationError as exc:
        raise FrameError(f"invalid {model.__name__} in frame {frame.request_id}: {exc}") from None


class FrameReader:
    """Splits a byte stream into frames; the length is checked before anything past the head is kept."""

    __slots__ = ("_buffer", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """The frames `data` completes, in order; raises FrameError at the first malformed one.

        After a FrameError the reader is unusable (its connection is closed).
        """
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        size = len(buffer)
        try:
            while size - offset >= FRAME_HEAD.size:
                length, kind, request_id, meta_length = FRAME_HEAD.unpack_from(buffer, offset)
                if length > self.max_frame_bytes or length < REST_HEAD_BYTES:
                    raise FrameError(
                        f"frame {request_id} of {length} bytes is outside this side's limits "
                        f"({REST_HEAD_BYTES} to {self.max_frame_bytes} bytes)"
                    )
                if kind not in KINDS:
                    raise FrameError(f"frame {request_id} has unknown kind {kind}")
                if meta_length > MAX_META_BYTES or REST_HEAD_BYTES + meta_length > length:
                    raise FrameError(
                        f"frame {request_id} has a meta length of {meta_length} in {length} bytes"
                    )
                end = offset + LENGTH.size + length
                if end > size:
                    break
                start = offset + FRAME_HEAD.size
                meta_end = start + meta_length
                frames.append(
                    Frame(kind, request_id, bytes(buffer[start:meta_end]), bytes(buffer[meta_end:end]))
                )
                offset = end
        finally:
            del buffer[:offset]
        return frames


WRITE_BUFFER_HIGH: Final = 1 << 20
"""Bytes of unsent frames past which a channel end's writers wait for the other end to read."""


class ChannelProtocol(asyncio.Protocol):
    """What both ends of a channel share: the stream transport and write flow control.

    Writers await `_writable` (cleared while the transport's buffer is over `WRITE_BUFFER_HIGH`);
    `connection_lost` must set it so that waiting writers see the closed transport and give up.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport and bound its write buffer."""
        # A stream transport (uvloop's is not an asyncio.Transport subclass, so no isinstance check).
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def pause_writing(self) -> None:
        """The transport's buffer is over the high mark: writers wait."""
        self._writable.clear()

    def resume_writing(self) -> None:
        """The buffer drained: writers go on."""
        self._writable.set()
