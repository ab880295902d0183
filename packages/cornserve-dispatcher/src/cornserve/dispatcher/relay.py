"""Relaying a graph's final stream from its executor's HTTP response to the caller over NATS.

Each line of the response goes through the task's descriptor (`stream_item_json`: the item's JSON,
framed, not re-validated; the caller validates it once); the items of one read are published as
one StreamMessage (one item when the relay keeps up, the items that piled up when it fell behind)
with a sequence number on the subject the caller subscribed to before sending the graph. The
stream always ends with exactly one terminal message — `end` (alone, or on the last items when the
response ended in the read that brought them), or `error` plus `end` — including
when the executor stalls past the idle deadline, breaks off, or this replica shuts down, so the
caller never waits on a stream nobody is feeding.

An executor may publish the stream's messages itself (`OpenStream.published`, when the graph has
no tail): the relay then reads only the body's newlines (with the same idle deadline) and its last
line (`PublishedStreamEnd`). A failure the executor reports becomes the end it publishes as the
message that follows the executor's; when the executor breaks off without saying how many messages
it sent, the end is an `abort` message, which the caller takes whatever seq it waits for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import nats.errors
from nats.aio.client import Client
from pydantic import ValidationError

from cornserve.bus.control import (
    PublishedStreamEnd,
    StreamMessage,
    stream_abort_message,
    stream_batches,
    stream_item_limit,
    stream_items_message,
)
from cornserve.bus.micro import ServiceFault
from cornserve.dispatcher.graph import OpenStream, Tail
from cornserve.dispatcher.lines import LineSplitter, LineTooLong
from cornserve.dispatcher.metrics import STREAM_ITEMS, STREAM_MESSAGES, ItemClock

logger = logging.getLogger(__name__)

END_LINE_BYTES = 1 << 20
"""Longest line of a published stream's body (its `PublishedStreamEnd`, the error line escaped in it)."""


class StreamFailure(Exception):
    """The stream cannot go on; the message is sent to the caller."""


class _TailFailure(Exception):
    """A producer the stream depends on failed (its message is complete: sent as it is)."""


@dataclass(eq=False)
class StreamRelay:
    """Reads one open streaming response and publishes its items on `subject`."""

    nc: Client
    stream: OpenStream
    subject: str
    idle_timeout_s: float
    on_finish: Callable[[], None]
    """Called once the terminal message is out (or could not be sent)."""
    tail: Tail | None = None
    """Producers of stream forwards still running (`graph.Tail`): the stream ends with their error."""
    tail_done: bool = field(default=False, init=False)
    _seq: int = field(default=0, init=False)
    _ended: bool = field(default=False, init=False)
    """The end went out with the last items: nothing more may follow."""
    _count_lost: bool = field(default=False, init=False)
    """The executor publishes the messages and has not said how many: an end must be an abort."""
    _cancel_reason: str | None = field(default=None, init=False)

    def cancelled_by_caller(self, reason: str) -> None:
        """The caller gave up (`InvokeCancel`): the coming cancellation is not a shutdown."""
        self._cancel_reason = reason

    @property
    def _label(self) -> str:
        routed = self.stream.routed
        return f"{routed.task_name} at position {routed.position}"

    async def run(self) -> None:
        """Relay until the response ends, fails or stalls; always publish a terminal message."""
        response = self.stream.response
        clean = False
        try:
            try:
                await self._relay_with_tail(response)
            except _TailFailure as failure:
                await self._finish(error=str(failure))
            except StreamFailure as failure:
                await self._finish(error=f"{self._label} failed while streaming: {failure}")
            except asyncio.CancelledError:
                if self._cancel_reason is not None:
                    why = f"cancelled by the caller ({self._cancel_reason})"
                else:
                    why = "the dispatcher shut down while relaying the stream"
                await self._finish(error=f"{self._label}: {why}")
                raise
            else:
                clean = True
                await self._finish(error=None)
        finally:
            if clean:
                response.release()
            else:
                response.close()  # drop the connection so the executor stops generating
                if self.tail is not None and not self.tail_done:
                    # Its producers still run: stop them, and free the stream forwards they sent.
                    self.tail.abandon(f"the stream of {self._label} ended early")
            self.on_finish()

    async def _relay_with_tail(self, response: aiohttp.ClientResponse) -> None:
        """Relay the lines while the tail runs; the first failure of either ends the stream."""
        tail = self.tail
        if tail is None:
            if self.stream.published:
                await self._watch_published(response)
            else:
                await self._relay_lines(response)
            return
        lines = asyncio.ensure_future(self._relay_lines(response))
        watch = asyncio.ensure_future(self._watch_tail(tail))
        try:
            done, _ = await asyncio.wait({lines, watch}, return_when=asyncio.FIRST_EXCEPTION)
            for task in (watch, lines):  # the tail's failure explains the consumer's
                failure = task.exception() if task in done and not task.cancelled() else None
                if failure is not None:
                    raise failure
            await lines
            await watch  # the consumer ended first: its producer must still answer, by the deadline
        finally:
            for task in (lines, watch):
                task.cancel()
            await asyncio.gather(lines, watch, return_exceptions=True)

    async def _watch_tail(self, tail: Tail) -> None:
        """Until the tail answered; its failure (or deadline) frees the graph's forwards and is raised."""
        try:
            await tail.wait()
            self.tail_done = True
        except ServiceFault as fault:
            reason = fault.message
        except TimeoutError:
            reason = f"{', '.join(tail.names)} did not finish within the graph's deadline"
        except Exception as exc:  # a dispatcher bug: still end the stream with a message
            logger.error("the tail of %s failed unexpectedly", self._label, exc_info=exc)
            reason = f"{', '.join(tail.names)} failed: {type(exc).__name__}: {exc}"
        else:
            return
        tail.abandon(reason)
        raise _TailFailure(reason)

    async def _relay_lines(self, response: aiohttp.ClientResponse) -> None:
        """Read what the executor sent so far, turn its lines into items, publish them as one message.

        One read per wakeup: a relay that keeps up publishes each item as it comes; one that fell
        behind (the lines piled up in the response's buffer) publishes them together, so a busy
        relay does less work per item instead of falling further behind.
        """
        lines = LineSplitter(stream_item_limit(self.nc.max_payload))
        clock = ItemClock(self.stream.routed.task_name, self.stream.started)
        while True:
            # The response may have ended in this very read (its last lines and the end of the
            # body in one segment): then its last items also end the stream, in one message.
            complete, ended = await self._read_lines(response, lines)
            items: list[bytes] = []
            try:
                for raw in complete:
                    item = self._item(raw)
                    if item is not None:
                        items.append(item)
                        clock.item()
            except BaseException:
                # The items before a line that fails the stream still reach the caller, in order.
                if items:
                    await self._publish(items, clock)
                raise
            # A read that completed no item line (part of a line, a keepalive) publishes nothing.
            # Producers still running (a tail) end the stream later, with their outcome.
            if items:
                await self._publish(items, clock, end=ended and self.tail is None)
            if ended:
                return

    async def _watch_published(self, response: aiohttp.ClientResponse) -> None:
        """The executor publishes the items: wait for its body's last line, newlines keeping it alive."""
        where = self.stream.routed.where
        task = self.stream.routed.task_name
        lines = LineSplitter(END_LINE_BYTES)
        self._count_lost = True
        while True:
            complete, ended = await self._read_lines(response, lines)
            for raw in complete:
                if not raw.strip():
                    continue  # a newline: the stream is moving
                try:
                    end = PublishedStreamEnd.model_validate_json(raw)
                except ValidationError as exc:
                    raise StreamFailure(
                        f"{where} ended its published stream with a malformed line: {exc}"
                    ) from None
                self._seq, self._count_lost = end.messages, False
                STREAM_ITEMS.labels(task=task).inc(end.items)
                STREAM_MESSAGES.labels(task=task).inc(end.messages)
                if end.end:
                    self._ended = True
                    return
                if end.line is None:
                    raise StreamFailure(f"{where} failed its published stream without an error line")
                self._item(end.line.encode())  # the task's descriptor raises the executor's error
                raise StreamFailure(
                    f"{where} failed its published stream with a line that is not an error: {end.line[:200]!r}"
                )
            if ended:
                raise StreamFailure(f"{where} ended its published stream without saying how it ended")

    async def _read_lines(
        self, response: aiohttp.ClientResponse, lines: LineSplitter
    ) -> tuple[list[bytes], bool]:
        """The lines one read of the body completes, and whether the body ended with it (its last line included).

        The read waits at most the idle deadline; a stall, a broken connection or a line over
        `lines`' limit fails the stream.
        """
        where = self.stream.routed.where
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                chunk = await response.content.readany()
        except TimeoutError:
            raise StreamFailure(f"{where} sent nothing for {self.idle_timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise StreamFailure(f"{where} broke off the stream: {type(exc).__name__}: {exc}") from None
        ended = not chunk or response.content.at_eof()
        try:
            complete = lines.feed(chunk) if chunk else []
            if ended:
                last = lines.finish()
                if last is not None:
                    complete.append(last)
        except LineTooLong as exc:
            raise StreamFailure(f"{where} sent an oversized line: {exc}") from None
        return complete, ended

    def _item(self, raw: bytes) -> bytes | None:
        """One line → its item's JSON object (None: a line without an item); a bad line fails the stream."""
        inv = self.stream.invocation
        descriptor = inv.task.descriptor
        try:
            line = raw.decode().rstrip("\r")
        except UnicodeDecodeError as exc:
            raise StreamFailure(f"{self.stream.routed.where} sent a line that is not UTF-8: {exc}") from None
        try:
            return descriptor.stream_item_json(inv.task, inv, line)
        except Exception as exc:
            raise StreamFailure(
                f"its descriptor {type(descriptor).__name__} could not read a stream line of "
                f"{self.stream.routed.where}: {type(exc).__name__}: {exc}"
            ) from None

    async def _publish(self, items: list[bytes], clock: ItemClock, end: bool = False) -> None:
        """Publish `items` in as few messages as the payload limit allows (`stream_batches`).

        `end`: the last message also ends the stream (no separate end message follows).
        """
        batches = stream_batches(items, self.nc.max_payload)
        for index, batch in enumerate(batches):
            await self._publish_batch(batch, end=end and index == len(batches) - 1)
            clock.message()

    async def _publish_batch(self, items: list[bytes], end: bool) -> None:
        try:
            await self.nc.publish(self.subject, stream_items_message(self._seq, items, end=end))
        except nats.errors.MaxPayloadError:
            raise StreamFailure(
                f"stream message {self._seq} is larger than the NATS payload limit; send large data "
                "through a DataForward instead"
            ) from None
        self._seq += 1
        self._ended = end

    async def _finish(self, error: str | None) -> None:
        if self._ended:
            return  # the last items carried the end
        if error is not None:
            logger.warning("stream on %s ended with an error: %s", self.subject, error)
        if self._count_lost:
            data = stream_abort_message(error or f"{self._label} ended its published stream without its end")
        else:
            data = StreamMessage(seq=self._seq, end=True, error=error).model_dump_json().encode()
        try:
            await self.nc.publish(self.subject, data)
        except nats.errors.Error as exc:
            logger.error("could not end the stream on %s: %s", self.subject, exc)
