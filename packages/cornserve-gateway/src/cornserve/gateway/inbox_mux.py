"""One long-lived NATS subscription for every graph inbox of the gateway.

Each attempt to run a graph needs a private inbox for its reply, keepalives, stream items and
reply parts (`dispatch_client.GraphInbox`). A subscription per attempt cost a SUB and an UNSUB
per graph: two more socket writes in the gateway (its NATS flushes were ~30% of its CPU per
request), two interest changes in nats-server, and nats-py's `next_msg` (a uuid, two tasks and a
`wait_for` per message). Instead the gateway subscribes once to `<inbox>.>` and hands out
`<inbox>.<token>` prefixes; `InboxMux` routes each message to the `MuxBox` of its prefix, whose
`next_msg` waits on a plain future with a deadline.

Semantics kept from a subscription per attempt: a box receives only messages sent after it was
opened (it exists before the graph is sent); a message for a closed (or unknown) box is dropped,
as an unsubscribed inbox's would be; and a box holds at most `pending_bytes_limit` bytes not yet
taken (beyond it a message is dropped with a warning, as nats-py drops a slow consumer's). On a
reconnect nats-py re-subscribes the one subscription, as it did the many.

Tokens are random (64 bits), not a counter: an executor told one stream subject
(`cornserve.bus.control.STREAM_SUBJECT_HEADER`) knows the inbox, and must not be able to name the
other boxes in it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import DEFAULT_SUB_PENDING_MSGS_LIMIT, Subscription

logger = logging.getLogger(__name__)


class MuxBox:
    """The messages of one prefix (`<inbox>.<token>.*`), read like a subscription's `next_msg`."""

    def __init__(self, mux: InboxMux, token: str, prefix: str, pending_bytes_limit: int) -> None:
        self._mux = mux
        self._token = token
        self.prefix = prefix
        self._limit = pending_bytes_limit
        self._queue: deque[Msg] = deque()
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def pending_msgs(self) -> int:
        """Messages received and not yet taken."""
        return len(self._queue)

    def put(self, msg: Msg) -> None:
        """A message for this prefix (from the mux); dropped past the pending-bytes bound."""
        size = len(msg.data)
        if self._limit > 0 and self._bytes + size >= self._limit:
            logger.warning(
                "graph inbox %s holds %d bytes not yet read; dropping a %d-byte message on %s (slow consumer)",
                self.prefix,
                self._bytes,
                size,
                msg.subject,
            )
            return
        self._bytes += size
        self._queue.append(msg)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_msg(self, timeout: float) -> Msg:
        """The next message within `timeout` seconds; nats.errors.TimeoutError if none came.

        Like a subscription's: ConnectionClosedError once the connection is closed (or the box is).
        """
        if not self._queue:
            if self._closed or self._mux.connection_closed:
                raise nats.errors.ConnectionClosedError
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                if self._mux.connection_closed:
                    raise nats.errors.ConnectionClosedError from None
                raise nats.errors.TimeoutError from None
            finally:
                self._waiter = None
            if not self._queue:  # woken by close()
                raise nats.errors.ConnectionClosedError
        msg = self._queue.popleft()
        self._bytes -= len(msg.data)
        return msg

    async def unsubscribe(self) -> None:
        """Stop receiving (idempotent): later messages for this prefix are dropped."""
        if self._closed:
            return
        self._closed = True
        self._mux.forget(self._token)
        self._queue.clear()
        self._bytes = 0
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class InboxMux:
    """The gateway's one inbox subscription and the boxes it routes to (see the module)."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._sub: Subscription | None = None
        self._base = ""
        self._boxes: dict[str, MuxBox] = {}
        self._lock = asyncio.Lock()

    async def open(self, pending_bytes_limit: int) -> MuxBox:
        """A new box with a fresh prefix; the subscription is made on first use."""
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    base = self._nc.new_inbox()
                    self._base = base
                    # The router only moves messages into boxes (each bounded by its own limit), so the
                    # shared queue in front of it is bounded by messages, not bytes.
                    self._sub = await self._nc.subscribe(
                        f"{base}.>",
                        cb=self._route,
                        pending_msgs_limit=DEFAULT_SUB_PENDING_MSGS_LIMIT,
                        pending_bytes_limit=0,
                    )
        token = secrets.token_hex(8)
        while token in self._boxes:  # a 64-bit collision among the open boxes: draw again
            token = secrets.token_hex(8)
        box = MuxBox(self, token, f"{self._base}.{token}", pending_bytes_limit)
        self._boxes[token] = box
        return box

    @property
    def connection_closed(self) -> bool:
        """Whether the NATS connection is closed for good."""
        return self._nc.is_closed

    def forget(self, token: str) -> None:
        """A box closed: its prefix's messages are dropped from now on."""
        self._boxes.pop(token, None)

    async def _route(self, msg: Msg) -> None:
        token = msg.subject[len(self._base) + 1 :].split(".", 1)[0]
        box = self._boxes.get(token)
        if box is not None:
            box.put(msg)

    async def close(self) -> None:
        """Unsubscribe (idempotent; the connection may already be closed)."""
        sub, self._sub = self._sub, None
        for box in list(self._boxes.values()):
            await box.unsubscribe()
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                logger.debug("unsubscribing the graph inboxes failed: %s", exc)
