"""The gateway's client of the Task Dispatcher: sends recorded graphs to its replicas over NATS.

`DispatcherClient` implements `cornserve.task.GraphRunner`, so an app driver's
`await task(input)` is executed by whichever dispatcher replica takes the request from the queue
group. Errors come back as `DispatchError` (a `TaskExecutionError`) with the dispatcher's code
(404 not deployed, 502 executor failed, 503 unavailable, 504 timeout, ...) for HTTP mapping.

Each attempt uses one private inbox `I` (a box of the gateway's one inbox subscription,
`inbox_mux.py`) opened before the graph is sent: the reply comes on `I.reply`, the replica's keepalives on `I.alive` and a relayed stream on `I.stream`, so
nothing can be missed and one deadline loop watches all three. A replica that stops sending
keepalives (killed, hung, partitioned) is noticed within `keepalive_timeout_s`: if it had not
delivered any output yet (no reply, or no stream item), the graph is retried once on another
replica with fresh forward ids; otherwise it fails at once with `DispatcherLost` (503).

An attempt the gateway gives up on before it settled (the app driver was cancelled because the
client went away or the request deadline passed, the stream was closed before its end, the
replica was taken for lost) is cancelled in the dispatchers with an `InvokeCancel` naming the
attempt's `cancel_id` (docs/reliability.md, "Cancellation").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import DEFAULT_SUB_PENDING_BYTES_LIMIT, Subscription
from pydantic import TypeAdapter, ValidationError

from cornserve.bus.control import (
    DISPATCH_CANCEL,
    DISPATCH_INVOKE,
    InvokeCancel,
    InvokeKeepalive,
    InvokeReply,
    InvokeRequest,
    StreamMessage,
)
from cornserve.bus.error_codec import decode_error
from cornserve.bus.reply_parts import ReplyAssembler, ReplyPartError
from cornserve.bus.schemas import new_request_id
from cornserve.gateway.forward_ids import forward_ids, fresh_ids, replace_ids
from cornserve.gateway.inbox_mux import InboxMux, MuxBox
from cornserve.runtime.logging import request_id_var
from cornserve.runtime.tracing import Attributes, client_span, inject_headers
from cornserve.task import Stream, TaskExecutionError, TaskInvocation, TaskOutput

logger = logging.getLogger(__name__)

_INVOCATIONS = TypeAdapter(list[TaskInvocation])
_NO_RESPONDERS = "503"
_RETRYABLE_ERRORS = {"shutting_down"}
"""Typed dispatcher errors that mean "this replica went away before finishing": retried once."""


class DispatchError(TaskExecutionError):
    """A graph failed in (or on its way to) the dispatcher.

    `code` is the HTTP-like status (an int) and `error` the machine-readable kind, e.g. 404
    `task_not_deployed`, 502 `executor_failed`, 503 `task_unavailable`/`no_dispatcher`/
    `dispatcher_lost`, 504 `timeout`.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int,
        error: str,
        task_name: str | None = None,
        position: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, task_name=task_name, position=position)
        self.code = code
        self.error = error
        self.retry_after_s = retry_after_s
        """For 429 `overloaded`: how long the dispatcher or executor asked callers to wait."""


class DispatcherLost(DispatchError):
    """The dispatcher replica running the graph died or shut down before finishing it (503).

    `relayed` says whether it had already delivered output (then the graph is not retried).
    """

    def __init__(self, message: str, *, replica_id: str | None, relayed: bool) -> None:
        super().__init__(message, code=503, error="dispatcher_lost")
        self.replica_id = replica_id
        self.relayed = relayed


DEFAULT_MAX_REPLY_BYTES = 64 * 1024 * 1024
"""The largest graph reply the gateway takes (in parts, when it is larger than one bus message)."""

HEADER_ROOM = 4096
"""Bytes of `max_payload` kept for the message's headers (the server counts them in the limit)."""


class PayloadTooLarge(DispatchError):
    """A graph's wire form is larger than the bus carries (413); refused before it is sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the task graph is {size} bytes, more than the message bus carries ({limit} bytes); "
            "pass large media as file: or http(s): URLs instead of data: URLs, or send smaller inputs",
            code=413,
            error="payload_too_large",
        )
        self.size = size
        self.limit = limit


def _give_up_reason(exc: BaseException) -> str:
    """Why the gateway gives up on an attempt, for the InvokeCancel (and the dispatcher's log)."""
    if isinstance(exc, asyncio.CancelledError):
        return "the request was cancelled (its client went away or its deadline passed)"
    if isinstance(exc, DispatcherLost):
        return "the gateway took the replica for lost"
    return f"the gateway gave up waiting: {type(exc).__name__}: {exc}"


def payload_limit(nc: Client) -> int:
    """The largest message body this connection may publish (the server's `max_payload`, less header room)."""
    return max(nc.max_payload - HEADER_ROOM, 0)


class Liveness:
    """When the replica running a graph was last heard from, and when it counts as lost."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.replica_id: str | None = None
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()

    def heard(self, replica_id: str | None = None) -> None:
        """A keepalive (or any message) arrived."""
        self._last = self._loop.time()
        if replica_id is not None:
            self.replica_id = replica_id

    def remaining(self) -> float:
        """Seconds until the replica counts as lost."""
        return self._last + self.timeout_s - self._loop.time()

    def lost(self, doing: str, relayed: bool) -> DispatcherLost:
        """The error for a replica that went silent while `doing`."""
        who = f"dispatcher replica {self.replica_id}" if self.replica_id else "no dispatcher replica"
        what = "sent no keepalive" if self.replica_id else "acknowledged the graph"
        return DispatcherLost(
            f"{who} {what} for {self.timeout_s:g} s while {doing}; it probably died or is overloaded. "
            "Retry the request (the other replicas keep serving); if this persists, check the "
            "dispatchers with `cornserve status`",
            replica_id=self.replica_id,
            relayed=relayed,
        )


class GraphInbox:
    """The private inbox of one attempt: `I.reply`, `I.alive`, `I.stream` on one subscription.

    It also knows the attempt's `cancel_id`: closing an inbox whose graph is not `settled` (no
    reply yet, or a stream not ended) tells the dispatchers to cancel it (`InvokeCancel`), so a
    graph nobody waits for any more stops running (client gone, deadline passed, replica lost).
    """

    def __init__(
        self,
        nc: Client,
        sub: Subscription | MuxBox,
        prefix: str,
        liveness: Liveness,
        cancel_id: str | None = None,
        request_id: str = "",
    ) -> None:
        self._nc = nc
        self._sub = sub
        self.prefix = prefix
        self.liveness = liveness
        self.cancel_id = cancel_id
        self.request_id = request_id
        self.settled = False
        """Nothing runs for this attempt any more (the reply came; a stream ended): no cancel needed."""
        self.stream_early: dict[int, StreamMessage] = {}
        self.stream_abort: StreamMessage | None = None
        """An `abort` message: the stream ends with its error as soon as the reader waits for a message."""
        self._closed = False

    def keep(self, message: StreamMessage) -> None:
        """Keep a stream message until the reader takes it (by seq; an abort aside)."""
        if message.abort:
            self.stream_abort = message
        else:
            self.stream_early[message.seq] = message

    @classmethod
    async def open(
        cls,
        nc: Client,
        liveness: Liveness,
        prefix: str | None = None,
        *,
        cancel_id: str | None = None,
        request_id: str = "",
        max_reply_bytes: int = 0,
        mux: InboxMux | None = None,
    ) -> GraphInbox:
        """Open it before anything is sent: a box of `mux`, else a subscription on `prefix` (or a new inbox).

        The inbox may queue a whole reply in parts (`max_reply_bytes`) besides keepalives and
        stream items: its pending-bytes bound (messages beyond it are dropped) is raised to twice
        that when nats-py's default (128 MiB) is smaller.
        """
        pending = max(DEFAULT_SUB_PENDING_BYTES_LIMIT, 2 * max_reply_bytes)
        if mux is not None:
            box = await mux.open(pending)
            return cls(nc, box, box.prefix, liveness, cancel_id, request_id)
        prefix = prefix or nc.new_inbox()
        sub = await nc.subscribe(f"{prefix}.*", pending_bytes_limit=pending)
        return cls(nc, sub, prefix, liveness, cancel_id, request_id)

    async def next(self, deadline: float, doing: str, relayed: bool) -> Msg | None:
        """The next reply or stream message (keepalives are absorbed); None past `deadline`.

        Raises DispatcherLost when the replica falls silent first.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            silent = self.liveness.remaining()
            if silent <= 0:
                if self._sub.pending_msgs == 0:  # not just a reader that fell behind its queue
                    raise self.liveness.lost(doing, relayed)
                silent = 0.001
            try:
                msg = await self._sub.next_msg(timeout=min(left, silent))
            except nats.errors.TimeoutError:
                msg = None
            if task is not None and task.cancelling() > cancels:
                # next_msg (asyncio.wait_for on Python 3.11) returns a message that raced with a
                # cancel instead of raising: the caller's cancel (client gone, deadline) must win.
                raise asyncio.CancelledError
            if msg is None:
                continue
            kind = msg.subject.rsplit(".", 1)[-1]
            if kind == "alive":
                try:
                    keepalive = InvokeKeepalive.model_validate_json(msg.data)
                except ValidationError:
                    logger.warning("ignoring a malformed keepalive on %s", msg.subject)
                    continue
                self.liveness.heard(keepalive.replica_id)
                continue
            self.liveness.heard()
            return msg

    async def close(self, reason: str = "the gateway stopped waiting for the graph") -> None:
        """Unsubscribe (idempotent); an unsettled graph is cancelled first (see the class)."""
        if self._closed:
            return
        self._closed = True
        if not self.settled and self.cancel_id is not None:
            self.settled = True
            cancel = InvokeCancel(cancel_id=self.cancel_id, request_id=self.request_id, reason=reason[:500])
            try:
                await self._nc.publish(DISPATCH_CANCEL, cancel.model_dump_json().encode())
            except nats.errors.Error as exc:  # the replica's own deadlines still bound the graph
                logger.warning("could not cancel graph %s: %s", self.request_id or self.cancel_id, exc)
        try:
            await self._sub.unsubscribe()
        except nats.errors.Error as exc:  # the connection may already be closed
            logger.debug("unsubscribing inbox %s failed: %s", self.prefix, exc)


StreamRetry = Callable[[], Awaitable[GraphInbox]]
"""Sends the graph again and returns the new attempt's inbox (for a stream lost before its first item)."""


class RelayedStream:
    """The async iterator behind a relayed Stream: StreamMessages in seq order, then unsubscribe.

    A class rather than an async generator so that `aclose()` unsubscribes even if the stream
    was never iterated (e.g. the app failed before reading it).
    """

    def __init__(
        self,
        inbox: GraphInbox,
        item_type: Any,
        idle_timeout_s: float,
        task_name: str,
        position: int,
        retry: StreamRetry | None = None,
    ) -> None:
        self._inbox = inbox
        self._retry = retry
        self._adapter: TypeAdapter[Any] = TypeAdapter(item_type)
        self._idle_timeout_s = idle_timeout_s
        self._task_name = task_name
        self._position = position
        self._next_seq = 0
        self._closed = False
        self._ended = False
        self._ready: deque[tuple[int, int | None, dict[str, Any]]] = deque()
        """Items received and not yet taken: (message seq, index in the message or None, item)."""

    def __aiter__(self) -> RelayedStream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        try:
            if not self._ready:
                if self._ended:
                    raise StopAsyncIteration
                await self._take_message()
            seq, index, item = self._ready.popleft()
            try:
                # Validated here, once: the relays only framed it.
                return self._adapter.validate_python(item)
            except ValidationError as exc:
                where = f"{seq}" if index is None else f"{seq}.{index}"
                raise self._failure(f"stream item {where} is not a valid item: {exc}") from None
        except BaseException:
            await self.aclose()
            raise

    async def _take_message(self) -> None:
        """The next message's items into `_ready` (a message of several items: all of them, in order)."""
        while not self._ready:
            message = await self._next_message()
            if message.end:
                self._inbox.settled = True  # the relay is over: nothing to cancel
            if message.error is not None:
                raise self._failure(message.error)
            if message.item is not None:
                self._ready.append((message.seq, None, message.item))
            for index, item in enumerate(message.items or ()):
                self._ready.append((message.seq, index, item))
            if message.end:
                self._ended = True
                if not self._ready:
                    raise StopAsyncIteration
                return

    async def _next_message(self) -> StreamMessage:
        loop = asyncio.get_running_loop()
        while self._next_seq not in self._inbox.stream_early:
            if self._inbox.stream_abort is not None:
                # The executor published the stream and failed without saying how far it got.
                return self._inbox.stream_abort
            early = self._inbox.stream_early
            deadline = loop.time() + self._idle_timeout_s
            doing = f"relaying the stream of {self._task_name} at position {self._position}"
            relayed = self._next_seq > 0 or bool(early)
            try:
                msg = await self._inbox.next(deadline, doing, relayed=relayed)
            except DispatcherLost as lost:
                if lost.relayed or self._retry is None:
                    raise
                retry, self._retry = self._retry, None
                logger.warning("retrying a streaming graph on another dispatcher replica: %s", lost)
                await self._inbox.close("the gateway took the replica for lost")
                self._inbox = await retry()
                continue
            if msg is None:
                raise DispatchError(
                    f"the stream of {self._task_name} at position {self._position} sent nothing for "
                    f"{self._idle_timeout_s:g} s",
                    code=504,
                    error="timeout",
                    task_name=self._task_name,
                    position=self._position,
                )
            if not msg.subject.endswith(".stream"):
                continue  # a duplicate reply: nothing to do with the stream
            try:
                message = StreamMessage.model_validate_json(msg.data)
            except ValidationError as exc:
                raise self._failure(
                    f"a malformed stream message arrived (from the dispatcher or the executor): {exc}"
                ) from None
            if message.abort or message.seq >= self._next_seq:
                self._inbox.keep(message)
        self._next_seq += 1
        return self._inbox.stream_early.pop(self._next_seq - 1)

    def _failure(self, message: str) -> DispatchError:
        return DispatchError(
            message, code=502, error="executor_failed", task_name=self._task_name, position=self._position
        )

    async def aclose(self) -> None:
        """Stop reading: cancel the graph unless its stream ended, and unsubscribe (idempotent)."""
        self._closed = True
        await self._inbox.close()


@dataclass
class _Graph:
    """One graph being dispatched: its invocations, wire form, and whether its one retry is used."""

    invocations: Sequence[TaskInvocation]
    wire: list[dict[str, Any]]
    ids_back: dict[str, str] = field(default_factory=dict)
    retried: bool = False

    @property
    def stream_position(self) -> int | None:
        """The invocation whose output streams (the graph's result; at most one), or None."""
        return next(
            (i for i, inv in enumerate(self.invocations) if isinstance(inv.task_output, Stream)), None
        )

    @property
    def streaming(self) -> bool:
        """Whether an invocation streams."""
        return self.stream_position is not None

    def use_retry(self) -> bool:
        """Use up the one retry: refresh every forward id; False if it was already used."""
        if self.retried:
            return False
        self.retried = True
        mapping = fresh_ids(forward_ids(self.invocations))
        self.ids_back = {new: old for old, new in mapping.items()}
        self.wire = replace_ids(self.wire, mapping)
        return True


class DispatcherClient:
    """Executes graphs on the dispatcher replicas (`cornserve.dispatch.invoke`) over `nc`."""

    def __init__(
        self,
        nc: Client,
        *,
        timeout_s: float = 300.0,
        margin_s: float = 10.0,
        keepalive_interval_s: float = 1.0,
        keepalive_timeout_s: float = 6.0,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        """`timeout_s` is each graph's deadline in the dispatcher; the reply is awaited `margin_s` longer.

        A relayed stream fails if no message arrives for `timeout_s + margin_s` (the dispatcher
        applies `timeout_s` as the idle deadline of the executor's stream). The replica is asked
        for a keepalive every `keepalive_interval_s` and counts as lost after `keepalive_timeout_s`
        without one (also the deadline for its first one, the acknowledgement). A reply larger
        than one bus message comes in ordered parts, at most `max_reply_bytes` in all (larger: 502
        `output_too_large`, and the graph is not retried: it ran).
        """
        if keepalive_timeout_s <= keepalive_interval_s:
            raise ValueError("keepalive_timeout_s must be longer than keepalive_interval_s")
        self._nc = nc
        self._mux = InboxMux(nc)
        self.timeout_s = timeout_s
        self.margin_s = margin_s
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_reply_bytes = max_reply_bytes

    async def run_graph(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        """Execute `invocations`; raise DispatchError (a TaskExecutionError) if the graph fails.

        A replica lost before it delivered any output (no keepalives before its reply, or before
        the first item of a relayed stream; or it shut down) gets the graph retried once on
        another replica, with fresh forward ids; a second loss is a DispatcherLost (503).
        """
        if not invocations:
            return []
        attributes: Attributes = {
            "cornserve.invocations": len(invocations),
            "cornserve.task_classes": sorted({type(inv.task).__name__ for inv in invocations}),
        }
        with client_span("graph.submit", attributes):
            return await self._run_graph(invocations)

    async def _run_graph(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        graph = _Graph(invocations, _INVOCATIONS.dump_python(list(invocations), mode="json"))
        try:
            inbox, reply = await self._send(graph)
        except DispatcherLost as lost:
            if lost.relayed or not graph.use_retry():
                raise
            logger.warning("retrying a graph on another dispatcher replica: %s", lost)
            inbox, reply = await self._send(graph)
        handed_over = False
        try:
            outputs = self._outputs(graph, reply, inbox)
            handed_over = graph.streaming  # the returned Stream reads (and closes) the inbox
            return outputs
        finally:
            if not handed_over:
                await inbox.close()

    async def _send(self, graph: _Graph) -> tuple[GraphInbox, InvokeReply]:
        """One attempt: subscribe, send, await the reply (with the ids the graph was sent with).

        A graph larger than the bus carries is refused (PayloadTooLarge, 413) before anything is sent.
        """
        liveness = Liveness(self.keepalive_timeout_s)
        inbox = await GraphInbox.open(self._nc, liveness, max_reply_bytes=self.max_reply_bytes, mux=self._mux)
        prefix = inbox.prefix
        payload = InvokeRequest(
            # The app request's id (set by the HTTP layer) names its graphs in the dispatchers' logs too.
            request_id=request_id_var.get() or new_request_id(),
            invocations=graph.wire,
            timeout_s=self.timeout_s,
            stream_subject=f"{prefix}.stream" if graph.streaming else None,
            keepalive_subject=f"{prefix}.alive",
            keepalive_interval_s=self.keepalive_interval_s,
            cancel_id=secrets.token_hex(16),
            reply_parts_subject=f"{prefix}.part",
            max_reply_bytes=self.max_reply_bytes,
        )
        inbox.cancel_id, inbox.request_id = payload.cancel_id, payload.request_id
        data = payload.model_dump_json().encode()
        limit = payload_limit(self._nc)
        if len(data) > limit:
            inbox.settled = True  # nothing was sent: nothing to cancel
            await inbox.close()
            raise PayloadTooLarge(len(data), limit)
        try:
            # The graph carries the trace context: the dispatcher's spans join the app request's trace.
            await self._nc.publish(
                DISPATCH_INVOKE, data, reply=f"{inbox.prefix}.reply", headers=inject_headers() or None
            )
            reply = await self._await_reply(inbox, graph.streaming)
        except BaseException as exc:
            await inbox.close(_give_up_reason(exc))
            raise
        if graph.ids_back:
            reply = InvokeReply(
                request_id=reply.request_id, outputs=replace_ids(reply.outputs, graph.ids_back)
            )
        return inbox, reply

    async def _resend_for_stream(self, graph: _Graph) -> GraphInbox:
        """Run a streaming graph again after its replica died before the first item; its new inbox.

        Only the new run's stream is used: the other outputs were already returned to the app
        from the first run.
        """
        inbox, _ = await self._send(graph)
        return inbox

    async def _await_reply(self, inbox: GraphInbox, streaming: bool) -> InvokeReply:
        """The replica's reply (one message, or ordered parts); stream messages arriving first are kept.

        Parts are bounded like the reply itself: by the reply deadline, the replica's keepalives
        (which it sends until the last part is out) and `max_reply_bytes`.
        """
        timeout = self.timeout_s + self.margin_s
        deadline = asyncio.get_running_loop().time() + timeout
        parts = ReplyAssembler(self.max_reply_bytes)
        while True:
            msg = await inbox.next(deadline, "running the graph", relayed=False)
            if msg is None:
                raise DispatchError(
                    f"the dispatcher did not answer within {timeout:g} s (graph deadline "
                    f"{self.timeout_s:g} s)",
                    code=504,
                    error="timeout",
                )
            if msg.subject.endswith(".stream"):
                try:
                    early = StreamMessage.model_validate_json(msg.data)
                except ValidationError as exc:
                    raise DispatchError(
                        f"a malformed stream message arrived (from the dispatcher or the executor): {exc}",
                        code=502,
                        error="bad_reply",
                    ) from None
                inbox.keep(early)
                continue
            if msg.subject.endswith(".part"):
                whole = self._add_part(parts, msg)
                if whole is None:
                    continue
                inbox.settled = not streaming
                return self._reply_from(whole)
            if msg.subject.endswith(".reply"):
                try:
                    reply = self._parse_reply(msg, inbox.liveness)
                except DispatchError:
                    inbox.settled = True  # an error reply: the graph is over on the replica
                    raise
                inbox.settled = not streaming  # a stream still runs until its end message
                return reply

    def _parse_reply(self, msg: Msg, liveness: Liveness) -> InvokeReply:
        headers = msg.headers or {}
        if headers.get("Status") == _NO_RESPONDERS and not msg.data:
            raise DispatchError(
                f"no dispatcher is running (no responders on {DISPATCH_INVOKE}); start the cluster with "
                "`cornserve up` or a replica with `cornserve-dispatcher --nats-url URL`",
                code=503,
                error="no_dispatcher",
            )
        decoded = decode_error(headers, msg.data)
        if decoded is not None:
            error = decoded.reply
            if error.error in _RETRYABLE_ERRORS:
                raise DispatcherLost(error.message, replica_id=liveness.replica_id, relayed=False)
            details = error.details
            task_name = details.get("task")
            position = details.get("position")
            retry_after = details.get("retry_after_s")
            raise DispatchError(
                error.message,
                code=decoded.status,
                error=error.error,
                task_name=task_name if isinstance(task_name, str) else None,
                position=position if isinstance(position, int) else None,
                retry_after_s=float(retry_after) if isinstance(retry_after, int | float) else None,
            )
        return self._reply_from(msg.data)

    @staticmethod
    def _add_part(parts: ReplyAssembler, msg: Msg) -> bytes | None:
        """One part of a large reply; the whole reply once complete. A bad part ends the graph (502)."""
        try:
            return parts.add(msg.headers, msg.data)
        except ReplyPartError as exc:
            # Only a sender that ignored our cap or broke the order gets here: the graph ran (or
            # still runs; closing the inbox cancels it). Never retried: it is not a lost replica.
            error = "output_too_large" if exc.too_large else "bad_reply"
            raise DispatchError(str(exc), code=502, error=error) from None

    @staticmethod
    def _reply_from(data: bytes) -> InvokeReply:
        try:
            return InvokeReply.model_validate_json(data)
        except ValidationError as exc:
            raise DispatchError(
                f"the dispatcher sent a malformed reply: {exc}", code=502, error="bad_reply"
            ) from None

    def _outputs(self, graph: _Graph, reply: InvokeReply, inbox: GraphInbox) -> list[TaskOutput]:
        invocations = graph.invocations
        if len(reply.outputs) != len(invocations):
            raise DispatchError(
                f"the dispatcher returned {len(reply.outputs)} outputs for {len(invocations)} invocations",
                code=502,
                error="bad_reply",
            )
        outputs: list[TaskOutput] = []
        streamed = graph.stream_position
        for position, (inv, data) in enumerate(zip(invocations, reply.outputs, strict=True)):
            name = inv.task.display_name()
            output_cls = inv.task.output_cls()
            if position == streamed:
                retry: StreamRetry | None = (
                    functools.partial(self._resend_for_stream, graph) if graph.use_retry() else None
                )
                stream_cls: type[Stream[Any]] = output_cls if issubclass(output_cls, Stream) else Stream
                source = RelayedStream(
                    inbox, stream_cls.item_type(), self.timeout_s + self.margin_s, name, position, retry
                )
                outputs.append(stream_cls.from_iterator(source))
                continue
            if data is None:
                raise DispatchError(
                    f"the dispatcher returned no output for {name} at position {position}",
                    code=502,
                    error="bad_reply",
                    task_name=name,
                    position=position,
                )
            try:
                outputs.append(output_cls.model_validate(data))
            except ValidationError as exc:
                raise DispatchError(
                    f"the output of {name} at position {position} is invalid: {exc}",
                    code=502,
                    error="bad_reply",
                    task_name=name,
                    position=position,
                ) from None
        return outputs
