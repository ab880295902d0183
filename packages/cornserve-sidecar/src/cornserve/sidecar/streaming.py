"""Streams through the sidecar: a producer sends items one chunk each, a consumer reads them in order.

This is the transport of a stream forward (`DataForward[Stream[T]]` in `cornserve.task`): item i
is chunk i of the forward's id, sent with ``num_chunks=None``; the producer ends the stream with
``close_stream(id, n)`` and a receive at chunk n then answers "end of stream". The consumer starts
on the first chunk while the producer is still producing.

Backpressure: a :class:`StreamWriter` keeps at most ``window`` chunks outstanding (sent, and not
yet released by every destination). Sending one more waits until the consumer marked the oldest
one done, so a slow consumer bounds the producer's memory in the arena to ``window`` chunks; the
wait has a deadline (:class:`~cornserve.sidecar.errors.SidecarTimeout` if the consumer stopped).

Failures: a producer that fails leaves the stream unclosed; whoever runs the graph gives it up and
has the sidecars drop its ids (`DropRequest`), so a consumer's pending receive fails at once with
:class:`~cornserve.sidecar.errors.DataDropped`; a producer that hangs or dies unnoticed makes the
consumer's receive fail at its deadline (:class:`~cornserve.sidecar.errors.RecvTimeout`).

A consumer that stops early (it needs no more items, the producer goes on): the producer's chunks
stay in its arena until every destination marked them done, so a consumer that just stopped
reading would leave the producer's sends waiting for room (and failing at their deadline).
:func:`drain_stream` reads and releases the rest up to the end; ``read_stream(...,
drain_on_close=True)`` does it when the iterator is closed before the end (``aclose()``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cornserve.sidecar.errors import AlreadyConsumed, BadRequest

if TYPE_CHECKING:
    from cornserve.sidecar.client import Sidecar

DEFAULT_STREAM_WINDOW = 16
"""Chunks a writer may have outstanding before it waits for its consumer."""


class StreamWriter:
    """The producer side of one stream: `send` each item, then `close`.

    Use as ``async with StreamWriter(sc, forward.id, forward.dst_sidecar_ranks) as w: await
    w.send(item)``: leaving the block normally closes the stream; leaving it with an exception
    leaves it unclosed (the graph failed, and its forwards are dropped) and stops watching.
    """

    def __init__(
        self,
        sidecar: Sidecar,
        id: str,
        dst_ranks: list[list[int]],
        *,
        window: int = DEFAULT_STREAM_WINDOW,
        timeout: float | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.sidecar = sidecar
        self.id = id
        self.dst_ranks = dst_ranks
        self.window = window
        self.timeout = timeout
        self.sent = 0
        """Items sent so far (the next item's chunk id)."""
        self.waits = 0
        """How many sends had to wait for the consumer (the window was full)."""
        self.waiting_for: int | None = None
        """The chunk whose release a send is waiting for right now, or None."""
        self._released_upto = 0
        """Chunks below this one are known to be released."""
        self._watching = False
        self._closed = False

    async def send(self, item: Any) -> None:
        """Send the next item (any value the sidecar carries, never None); waits while the window is full."""
        if self._closed:
            raise BadRequest(f"stream {self.id!r} is already closed")
        if item is None:
            raise BadRequest(
                f"stream {self.id!r}: None cannot be an item (a receive answers None at the end)"
            )
        if not self._watching:
            await self.sidecar.watch_releases(self.id)
            self._watching = True
        oldest = self.sent - self.window
        if oldest >= self._released_upto:
            self.waits += 1
            self.waiting_for = oldest
            try:
                await self.sidecar.wait_released(self.id, oldest, timeout=self.timeout)
            finally:
                self.waiting_for = None
            self._released_upto = oldest + 1
        await self.sidecar.send(
            item,
            self.id,
            self.dst_ranks,
            chunk_id=self.sent,
            num_chunks=None,
            timeout=self.timeout,
            notify_released=True,
        )
        self.sent += 1

    async def close(self) -> None:
        """End the stream after the items sent: the consumer's next receive answers end of stream."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.sidecar.close_stream(self.id, self.sent, self.dst_ranks, timeout=self.timeout)
        finally:
            await self._unwatch()

    async def abandon(self) -> None:
        """Stop without closing (the producer failed): the consumer must not take it for a whole stream."""
        self._closed = True
        await self._unwatch()

    async def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            await self.sidecar.unwatch_releases(self.id)

    async def __aenter__(self) -> StreamWriter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abandon()


async def read_stream(
    sidecar: Sidecar,
    id: str,
    *,
    timeout: float | None = None,
    copy: bool = True,
    release_at_once: bool = False,
    drain_on_close: bool = False,
) -> AsyncGenerator[Any, None]:
    """The items of stream ``id`` in order, each marked done once the next one is asked for.

    ``timeout`` bounds the wait for each item (the producer's pace), not the whole stream. With
    ``copy=False`` a tensor item is a read-only view of the arena, valid until the next item is
    asked for; the default copies it, so items may be kept.

    ``release_at_once`` marks each (copied) item done before it is yielded, so the producer's arena
    holds nothing for a consumer that keeps items while it waits (a reader that reads ahead).
    ``drain_on_close``: closing the iterator before the end (``aclose()``, or ``async with
    contextlib.aclosing(...)``) reads and releases the rest of the stream (:func:`drain_stream`)
    before the close returns; run the close where that wait is welcome (the consumer's own task),
    a drain error (the producer failed meanwhile) is raised by ``aclose()``.
    """
    if release_at_once and not copy:
        raise ValueError("release_at_once needs copy=True: a view is invalid once its chunk is released")
    chunk = 0
    while True:
        item = await sidecar.recv(id, chunk, timeout=timeout, copy=copy)
        if item is None:
            return
        if release_at_once:
            await sidecar.mark_done(id, chunk)
        closed_early = False
        try:
            yield item
        except GeneratorExit:
            closed_early = True
            raise
        finally:
            if not release_at_once:
                await sidecar.mark_done(id, chunk)
            if closed_early and drain_on_close:
                await drain_stream(sidecar, id, chunk + 1, timeout=timeout)
        chunk += 1


async def drain_stream(
    sidecar: Sidecar, id: str, first_chunk: int = 0, *, timeout: float | None = None
) -> int:
    """Read and mark done every chunk of stream ``id`` from ``first_chunk`` up to its end; how many.

    For a consumer that stopped early (see the module's docstring). A chunk the consumer already
    marked done is skipped. Each wait has the deadline ``timeout``: a producer that stopped without
    closing the stream makes it raise :class:`~cornserve.sidecar.errors.RecvTimeout`, a dropped
    stream :class:`~cornserve.sidecar.errors.DataDropped` (what is left is the TTL's).
    """
    chunk, released = first_chunk, 0
    while True:
        try:
            item = await sidecar.recv(id, chunk, timeout=timeout)  # a view, never read
        except AlreadyConsumed:
            chunk += 1
            continue
        if item is None:
            return released
        del item
        await sidecar.mark_done(id, chunk)
        released += 1
        chunk += 1
