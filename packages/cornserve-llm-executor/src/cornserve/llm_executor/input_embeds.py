"""The talker role: input embeddings read from a sidecar stream as generation needs them.

A `DataForward[Stream[Tensor]]` arrives chunk by chunk (chunk `i` a `[rows, hidden]` tensor, or one
`[hidden]` row; the producer closes the stream after the last). An `InputEmbedsFeed` reads the
chunks in order on its own task through `cornserve.sidecar.streaming.read_stream` (each copied out
of the arena and marked done at once), and reads ahead by at most `PREFETCH_ROWS` unused rows: the
generation consumes one row per token, so a talker that falls behind stops reading, its producer's
sends wait for arena room, and the stream's memory stays bounded (backpressure). The engine steps a
talker sequence only when its next row is here, so the first token is made from the first row,
before the producer has finished.

A sequence that stops early (end-of-sequence token, `max_tokens`, its caller hung up) leaves the
rest of the stream unread. `stop` only tells the feed's task, which then closes its `read_stream`
iterator with `drain_on_close`: the same task reads and releases the rest up to the end (each wait
bounded), so the producer's sends are not left waiting for room. One task owns the stream from its
first chunk to its end, and it is never cancelled to stop it: a cancellation that lands as a
receive completes is swallowed by `asyncio.wait_for` on Python 3.11 (inside nats-py's request),
which used to leave the feed reading on after `stop` and waiting forever, with no drain
(docs/reliability.md, "Early-stop drain").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import torch

from cornserve.llm_executor.errors import EmbeddingError, ExecutorRequestError, GenerationFailed
from cornserve.llm_executor.sidecar_errors import sidecar_errors
from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import SidecarError
from cornserve.sidecar.streaming import drain_stream, read_stream
from cornserve.task.forward import DataForward

logger = logging.getLogger(__name__)

PREFETCH_ROWS = 2
"""Rows read ahead of the generation (one being used, one arriving)."""


class InputEmbedsFeed:
    """One request's input rows: `rows` grows as chunks arrive; `closed` once the stream ended."""

    def __init__(
        self,
        reader: InputEmbedsReader,
        forward: DataForward[Any],
        hidden_size: int,
        on_input: Callable[[], None],
    ) -> None:
        self.reader = reader
        self.forward_id = forward.id
        self.hidden_size = hidden_size
        self.rows: list[torch.Tensor] = []
        self.closed = False
        """The producer closed the stream and every chunk was read."""
        self.error: ExecutorRequestError | None = None
        self._on_input = on_input
        self._consumed = 0
        self._chunks = 0
        self._stopping = False
        self._at_item = False
        """`_stream` is suspended after an item: closing it drains the rest (`drain_on_close`)."""
        self._progress = asyncio.Event()
        self._stream: AsyncGenerator[Any, None] = read_stream(
            reader.sidecar,
            forward.id,
            timeout=reader.timeout_s,
            copy=True,
            release_at_once=True,
            drain_on_close=True,
        )
        self._task = asyncio.create_task(self._run(), name=f"input-embeds-{forward.id}")
        reader.track(self._task)

    @property
    def received(self) -> int:
        """Rows read so far."""
        return len(self.rows)

    def consume(self, used: int) -> None:
        """The generation has used `used` rows: read further (called on the event loop)."""
        self._consumed = used
        self._progress.set()

    def abandon(self) -> None:
        """The request never started (refused right after `open`): the same as `stop`."""
        self.stop()

    def stop(self) -> None:
        """The sequence is over: the feed's task reads no more rows and drains the rest in the background."""
        self._stopping = True
        self._progress.set()

    async def _run(self) -> None:
        try:
            await self._read()
        except Exception as exc:  # a bug: fail the sequence with it rather than leave it waiting for rows
            logger.exception("reading input embeds %s failed", self.forward_id)
            self.error = GenerationFailed(
                f"reading input embeddings forward {self.forward_id} failed: {exc!r}"
            )
        finally:
            self._on_input()
        # Not after a cancellation (`InputEmbedsReader.close`, shutdown): that skips this line.
        await self._drain()

    async def _read(self) -> None:
        """Read rows while the sequence wants them; returns once stopped, failed or at the end."""
        try:
            while not self._stopping:
                if len(self.rows) - self._consumed >= PREFETCH_ROWS:
                    self._progress = asyncio.Event()
                    await self._progress.wait()
                    continue
                chunk = self._chunks
                self._at_item = False
                with sidecar_errors(self._timed_out, self._failed):
                    data = await anext(self._stream, None)
                if data is None:
                    self.closed = True
                    return
                self._at_item = True
                self._chunks = chunk + 1
                if self._stopping:
                    return  # released already; the sequence that wanted it is over
                self.rows.extend(self._check(data, chunk))
                self._on_input()
        except ExecutorRequestError as exc:
            self.error = exc

    def _timed_out(self) -> str:
        return (
            f"chunk {self._chunks} of input embeddings forward {self.forward_id} did not arrive through "
            f"sidecar rank {self.reader.sidecar.rank} within {self.reader.timeout_s:.1f}s (is its "
            "producer running and sending to this rank?)"
        )

    def _failed(self) -> str:
        return f"chunk {self._chunks} of forward {self.forward_id} could not be received"

    async def _drain(self) -> None:
        """Release the rest of the stream up to its end (unless it ended): nobody will use it.

        After an error too: a bad row does not stop the producer, whose arena frees only what this
        rank releases; after a failed receive (or before the first) the rest is drained from the
        chunk not received. Against a producer that died the drain ends at its deadline.
        """
        logger.debug(
            "input embeds %s stopped: closed=%s error=%r after %d chunks",
            self.forward_id,
            self.closed,
            self.error,
            self._chunks,
        )
        if self.closed:
            return
        try:
            await self._stream.aclose()  # suspended after an item: `drain_on_close` reads the rest
            if not self._at_item:
                await drain_stream(
                    self.reader.sidecar, self.forward_id, self._chunks, timeout=self.reader.timeout_s
                )
        except SidecarError as exc:
            # The producer failed or hung after this sequence stopped: nobody waits for these rows,
            # and the sidecar's TTL (or the graph's drop) frees what is left.
            logger.info("stopped draining input embeds %s: %r", self.forward_id, exc)
            return
        logger.debug("drained input embeds %s up to its end", self.forward_id)

    def _check(self, data: object, chunk: int) -> list[torch.Tensor]:
        where = f"input embeddings forward {self.forward_id} chunk {chunk}"
        if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim not in (1, 2):
            raise EmbeddingError(
                f"{where} must be a float tensor of [rows, {self.hidden_size}] or [{self.hidden_size}], got "
                f"{type(data).__name__} {list(getattr(data, 'shape', []))}"
            )
        rows = data.reshape(-1, data.shape[-1]).to(torch.float32)
        if rows.shape[1] != self.hidden_size or rows.shape[0] == 0:
            raise EmbeddingError(
                f"{where} has shape {list(data.shape)}; its rows must have this model's hidden size "
                f"{self.hidden_size} (the producer's hidden size must match, or project first)"
            )
        return list(rows.unbind(0))


class InputEmbedsReader:
    """Reads input-embedding streams on this executor's sidecar rank; owns the feeds' tasks."""

    def __init__(self, sidecar: Sidecar, timeout_s: float) -> None:
        self.sidecar = sidecar
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def open(
        self, forward: DataForward[Any], hidden_size: int, on_input: Callable[[], None]
    ) -> InputEmbedsFeed:
        """Start reading `forward`'s chunks for one request."""
        return InputEmbedsFeed(self, forward, hidden_size, on_input)

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a feed's task (reading, then draining) until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop the feeds and their drains (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
