"""The talker role: input embeddings read from a sidecar stream as generation needs them.

A `DataForward[Stream[Tensor]]` arrives chunk by chunk (chunk `i` a `[rows, hidden]` tensor, or one
`[hidden]` row; the producer closes the stream after the last). An `InputEmbedsFeed` reads the
chunks in order on its own task, copies each out of the arena and marks it done at once, and reads
ahead by at most `PREFETCH_ROWS` unused rows: the generation consumes one row per token, so a
talker that falls behind stops reading, its producer's sends wait for arena room, and the stream's
memory stays bounded (backpressure). The engine steps a talker sequence only when its next row is
here, so the first token is made from the first row, before the producer has finished.

A sequence that stops early (end-of-sequence token, `max_tokens`, its caller hung up) leaves the
rest of the stream unread; the reader drains it in the background (each chunk marked done as it
arrives, each wait bounded) so the producer's sends are not left waiting for room.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import torch

from cornserve.llm_executor.errors import EmbeddingError, ExecutorRequestError
from cornserve.llm_executor.sidecar_errors import sidecar_errors
from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import AlreadyConsumed, SidecarError
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
        self._progress = asyncio.Event()
        self._next_chunk = 0
        self._task = asyncio.create_task(self._run(), name=f"input-embeds-{forward.id}")

    @property
    def received(self) -> int:
        """Rows read so far."""
        return len(self.rows)

    def consume(self, used: int) -> None:
        """The generation has used `used` rows: read further (called on the event loop)."""
        self._consumed = used
        self._progress.set()

    def abandon(self) -> None:
        """The request never started (refused right after `open`): stop reading, drain from where it was."""
        self._task.cancel()
        self.reader.drain(self.forward_id, self._next_chunk)

    async def stop(self) -> None:
        """The sequence is over: stop reading, and drain what the producer still sends in the background."""
        if not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        logger.info(
            "input embeds %s stopped: closed=%s error=%r next chunk %d",
            self.forward_id,
            self.closed,
            self.error,
            self._next_chunk,
        )
        if not self.closed:
            # After an error too: a read that failed as it was cancelled (or a bad row) does not stop
            # the producer, and its arena frees only what this rank releases. Against a dead producer
            # the drain just times out.
            self.reader.drain(self.forward_id, self._next_chunk)

    async def _run(self) -> None:
        try:
            while True:
                while len(self.rows) - self._consumed >= PREFETCH_ROWS:
                    self._progress = asyncio.Event()
                    await self._progress.wait()
                chunk = self._next_chunk
                data = await self.reader.recv(self.forward_id, chunk)
                if data is None:
                    self.closed = True
                    return
                # The chunk is ours from here: a drain after a cancellation starts past it, and its
                # release completes even if this task is cancelled meanwhile.
                self._next_chunk = chunk + 1
                await asyncio.shield(self.reader.done(self.forward_id, chunk))
                self.rows.extend(self._check(data, chunk))
                self._on_input()
        except ExecutorRequestError as exc:
            self.error = exc
        finally:
            self._on_input()

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
    """Reads input-embedding streams on this executor's sidecar rank; owns the background drains."""

    def __init__(self, sidecar: Sidecar, timeout_s: float) -> None:
        self.sidecar = sidecar
        self.timeout_s = timeout_s
        self._drains: set[asyncio.Task[None]] = set()

    def open(
        self, forward: DataForward[Any], hidden_size: int, on_input: Callable[[], None]
    ) -> InputEmbedsFeed:
        """Start reading `forward`'s chunks for one request."""
        return InputEmbedsFeed(self, forward, hidden_size, on_input)

    async def recv(self, forward_id: str, chunk: int) -> object:
        """Chunk `chunk` copied out of the arena, not released yet (None past the end of the stream)."""
        timed_out = (
            f"chunk {chunk} of input embeddings forward {forward_id} did not arrive through sidecar rank "
            f"{self.sidecar.rank} within {self.timeout_s:.1f}s (is its producer running and sending to "
            "this rank?)"
        )
        with sidecar_errors(timed_out, f"chunk {chunk} of forward {forward_id} could not be received"):
            async with asyncio.timeout(self.timeout_s + 5.0):
                data = await self.sidecar.recv(forward_id, chunk, timeout=self.timeout_s, copy=True)
        return data

    async def done(self, forward_id: str, chunk: int) -> None:
        """Release a received chunk (its bytes were copied out); a failure is logged and left to the TTL."""
        try:
            await self.sidecar.mark_done(forward_id, chunk)
        except SidecarError as exc:
            logger.warning("could not mark chunk %d of forward %s done: %s", chunk, forward_id, exc)

    def drain(self, forward_id: str, first_chunk: int) -> None:
        """Read and release the rest of a stream nobody will use, in the background."""
        task = asyncio.create_task(self._drain(forward_id, first_chunk), name=f"drain-{forward_id}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, forward_id: str, chunk: int) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeout_s + 5.0):
                        data = await self.sidecar.recv(forward_id, chunk, timeout=self.timeout_s)
                except AlreadyConsumed:  # the feed released it just before it stopped
                    chunk += 1
                    continue
                if data is None:
                    logger.info("drained forward %s up to its end, chunk %d", forward_id, chunk)
                    return
                await self.done(forward_id, chunk)
                chunk += 1
        except (SidecarError, TimeoutError) as exc:
            logger.info("stopped draining forward %s at chunk %d: %r", forward_id, chunk, exc)

    async def close(self) -> None:
        """Stop the drains (shutdown)."""
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
