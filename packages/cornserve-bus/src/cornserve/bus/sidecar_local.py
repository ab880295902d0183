"""Wire format of a sidecar server's same-node control socket (a UNIX stream socket).

NATS stays the control path across nodes and the fallback; on one node a request to the local
server costs two broker hops more than it needs to (client -> nats-server -> sidecar and back), so
each server also listens on a UNIX socket next to its arena and answers the same requests there.

Framing, both directions big-endian:

- On accept the server writes a challenge: ``CHALLENGE_BYTES`` ASCII hex characters.
- Request: ``REQUEST_HEAD`` (verb length, JSON length, payload length, trace-context length), the
  verb (ASCII), the caller's W3C ``traceparent`` (ASCII, empty when it has no span: the NATS
  header's twin, so one invocation stays one trace), the JSON body (the verb's pydantic request
  model, as on NATS), then ``payload length`` raw bytes (only the local-only verb ``put``: a send
  whose bytes ride along, written into the arena by the server).
- Reply: ``REPLY_HEAD`` (status, JSON length) then the JSON body: status 0 is the verb's reply model,
  anything else an HTTP-like error code with an :class:`~cornserve.bus.schemas.ErrorReply` body.
- A request whose verb-length byte has the :data:`ONE_WAY` bit set gets no reply at all (the sender
  does not wait; the server logs a failure instead). Servers send a peer's ``release`` this way:
  its answer never changed anything, and it cost a write and a wake-up per transfer.

A connection carries one request at a time (clients keep a pool). Peer servers open a connection
with a ``hello`` proving the cluster's peer secret (:class:`LocalHello`) before peer verbs
(deliver, release, notice) are accepted on it; without a secret, peers use NATS as before.
Everything read from the socket is untrusted: sizes are capped before anything is read, and every
body is validated by its model.
"""

from __future__ import annotations

import struct

from pydantic import Field

from cornserve.bus.schemas import WireModel

REQUEST_HEAD = struct.Struct("!BIIB")
"""Verb length, JSON length, payload length, trace-context length."""
ONE_WAY = 0x80
"""Set in a request's verb-length byte: no reply (verbs are at most ``MAX_VERB_BYTES`` < 0x80 long)."""
REPLY_HEAD = struct.Struct("!HI")
"""Status (0 = success), JSON length."""
CHALLENGE_BYTES = 64
"""Hex characters of the per-connection challenge the server sends on accept."""
MAX_VERB_BYTES = 32
MAX_TRACE_BYTES = 128
"""A ``traceparent`` is 55 characters; anything longer than this closes the connection."""
MAX_JSON_BYTES = 1 << 20
"""A longer request or reply body closes the connection unread."""
MAX_INLINE_BYTES = 1 << 20
"""Largest payload a ``put`` may carry (bigger sends reserve arena space first, then write it)."""
SOCKET_NAME = "ctl.sock"
"""File name of the socket inside its owner-only directory."""

PUT = "put"
"""Local-only verb: a ``SendRequest`` whose bytes follow it (the server allocates and copies)."""
HELLO = "hello"
"""Local-only verb: a peer server authenticates the connection (:class:`LocalHello`)."""
OK = 0


class LocalHello(WireModel):
    """A peer server's proof that it holds the cluster's peer secret, bound to this connection.

    ``mac`` is ``PeerKey.sender_mac(challenge, source_rank, dst_rank, "local")`` over the challenge
    the server sent on accept.
    """

    request_id: str = ""
    source_rank: int = Field(ge=0)
    dst_rank: int = Field(ge=0)
    mac: str = Field(pattern=r"^[0-9a-f]{64}$")
