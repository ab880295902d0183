"""The gateway's dispatcher: sends recorded graphs to the dispatcher replicas over NATS.

`NatsDispatcherClient` implements `cornserve.task.Dispatcher`, so an app driver's
`await task(input)` is executed by whichever dispatcher replica takes the request from the queue
group. Errors come back as `DispatchError` (a `TaskExecutionError`) with the dispatcher's code
(404 not deployed, 502 executor failed, 503 unavailable, 504 timeout, ...) for HTTP mapping. A
streamed final output is read from a private inbox subscribed before the graph is sent, so no
stream message can be missed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from pydantic import TypeAdapter, ValidationError

from cornserve.bus.control import DISPATCH_INVOKE, InvokeReply, InvokeRequest, StreamMessage
from cornserve.bus.micro import NoResponders, RequestTimeout, ServiceErrorReply, request
from cornserve.task import Stream, TaskExecutionError, TaskInvocation, TaskOutput

logger = logging.getLogger(__name__)

_INVOCATIONS = TypeAdapter(list[TaskInvocation])


class DispatchError(TaskExecutionError):
    """A graph failed in (or on its way to) the dispatcher.

    `code` is the HTTP-like status (an int) and `error` the machine-readable kind, e.g. 404
    `task_not_deployed`, 502 `executor_failed`, 503 `task_unavailable`/`no_dispatcher`, 504 `timeout`.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int,
        error: str,
        task_name: str | None = None,
        position: int | None = None,
    ) -> None:
        super().__init__(message, task_name=task_name, position=position)
        self.code = code
        self.error = error


def stream_item_type(output_cls: type[Any]) -> Any:
    """The item type of a `Stream[X]` output class (X), or None for an unparametrized Stream."""
    for klass in output_cls.__mro__:
        meta = getattr(klass, "__pydantic_generic_metadata__", None)
        if meta and meta["origin"] is not None and issubclass(meta["origin"], Stream) and meta["args"]:
            return meta["args"][0]
    return None


class RelayedStream:
    """The async iterator behind a relayed Stream: StreamMessages in seq order, then unsubscribe.

    A class rather than an async generator so that `aclose()` unsubscribes even if the stream
    was never iterated (e.g. the app failed before reading it).
    """

    def __init__(
        self, sub: Subscription, item_type: Any, idle_timeout_s: float, task_name: str, position: int
    ) -> None:
        self._sub = sub
        self._adapter: TypeAdapter[Any] | None = TypeAdapter(item_type) if item_type is not None else None
        self._idle_timeout_s = idle_timeout_s
        self._task_name = task_name
        self._position = position
        self._next_seq = 0
        self._early: dict[int, StreamMessage] = {}
        self._closed = False

    def __aiter__(self) -> RelayedStream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        try:
            message = await self._next_message()
            if message.error is not None:
                raise self._failure(message.error)
            if message.end:
                raise StopAsyncIteration
            if self._adapter is None:
                return message.item
            try:
                return self._adapter.validate_python(message.item)
            except ValidationError as exc:
                raise self._failure(f"stream item {message.seq} is not a valid item: {exc}") from None
        except BaseException:
            await self.aclose()
            raise

    async def _next_message(self) -> StreamMessage:
        while self._next_seq not in self._early:
            try:
                msg = await self._sub.next_msg(timeout=self._idle_timeout_s)
            except nats.errors.TimeoutError:
                raise DispatchError(
                    f"the stream of {self._task_name} at position {self._position} sent nothing for "
                    f"{self._idle_timeout_s:g} s",
                    code=504,
                    error="timeout",
                    task_name=self._task_name,
                    position=self._position,
                ) from None
            try:
                message = StreamMessage.model_validate_json(msg.data)
            except ValidationError as exc:
                raise self._failure(f"the dispatcher sent a malformed stream message: {exc}") from None
            if message.seq >= self._next_seq:
                self._early[message.seq] = message
        self._next_seq += 1
        return self._early.pop(self._next_seq - 1)

    def _failure(self, message: str) -> DispatchError:
        return DispatchError(
            message, code=502, error="executor_failed", task_name=self._task_name, position=self._position
        )

    async def aclose(self) -> None:
        """Stop reading: unsubscribe from the inbox (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._sub.unsubscribe()
        except nats.errors.Error as exc:  # the connection may already be closed
            logger.debug("unsubscribing a stream inbox failed: %s", exc)


class NatsDispatcherClient:
    """Executes graphs on the dispatcher replicas (`cornserve.dispatch.invoke`) over `nc`."""

    def __init__(self, nc: Client, *, timeout_s: float = 300.0, margin_s: float = 10.0) -> None:
        """`timeout_s` is each graph's deadline in the dispatcher; the reply is awaited `margin_s` longer.

        A relayed stream fails if no message arrives for `timeout_s + margin_s` (the dispatcher
        applies `timeout_s` as the idle deadline of the executor's stream).
        """
        self._nc = nc
        self.timeout_s = timeout_s
        self.margin_s = margin_s

    async def dispatch(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        """Execute `invocations`; raise DispatchError (a TaskExecutionError) if the graph fails."""
        if not invocations:
            return []
        wire: list[dict[str, Any]] = _INVOCATIONS.dump_python(list(invocations), mode="json")
        last = invocations[-1]
        sub: Subscription | None = None
        stream_subject: str | None = None
        if isinstance(last.task_output, Stream):
            stream_subject = self._nc.new_inbox()
            sub = await self._nc.subscribe(stream_subject)
        payload = InvokeRequest(invocations=wire, timeout_s=self.timeout_s, stream_subject=stream_subject)
        try:
            reply = await self._send(payload)
            outputs = self._outputs(invocations, reply, sub)
        except BaseException:
            if sub is not None:
                await sub.unsubscribe()
            raise
        return outputs

    async def _send(self, payload: InvokeRequest) -> InvokeReply:
        timeout = self.timeout_s + self.margin_s
        try:
            return await request(self._nc, DISPATCH_INVOKE, payload, InvokeReply, timeout)
        except ServiceErrorReply as exc:
            details = exc.error.details
            task_name = details.get("task")
            position = details.get("position")
            raise DispatchError(
                exc.error.message,
                code=_int_code(exc.code),
                error=exc.error.error,
                task_name=task_name if isinstance(task_name, str) else None,
                position=position if isinstance(position, int) else None,
            ) from None
        except NoResponders:
            raise DispatchError(
                f"no dispatcher is running (no responders on {DISPATCH_INVOKE}); start the cluster with "
                "`cornserve up` or a replica with `cornserve-dispatcher --nats-url URL`",
                code=503,
                error="no_dispatcher",
            ) from None
        except RequestTimeout:
            raise DispatchError(
                f"the dispatcher did not answer within {timeout:g} s (graph deadline {self.timeout_s:g} s)",
                code=504,
                error="timeout",
            ) from None

    def _outputs(
        self, invocations: Sequence[TaskInvocation], reply: InvokeReply, sub: Subscription | None
    ) -> list[TaskOutput]:
        if len(reply.outputs) != len(invocations):
            raise DispatchError(
                f"the dispatcher returned {len(reply.outputs)} outputs for {len(invocations)} invocations",
                code=502,
                error="bad_reply",
            )
        outputs: list[TaskOutput] = []
        last = len(invocations) - 1
        for position, (inv, data) in enumerate(zip(invocations, reply.outputs, strict=True)):
            name = inv.task.display_name()
            output_cls = inv.task.output_cls()
            if position == last and sub is not None:
                source = RelayedStream(
                    sub, stream_item_type(output_cls), self.timeout_s + self.margin_s, name, position
                )
                stream_cls: type[Stream[Any]] = output_cls if issubclass(output_cls, Stream) else Stream
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


def _int_code(code: str) -> int:
    try:
        return int(code)
    except ValueError:
        return 502
