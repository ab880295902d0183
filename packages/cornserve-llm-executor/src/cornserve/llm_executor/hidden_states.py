"""The thinker role: sending each generated token's last-layer hidden state through the sidecar.

The engine hands every token's hidden state (a `[hidden]` float32 row) to the sequence's
`HiddenStateSender` on the event loop, in token order, without waiting. One background task per
request groups rows into chunks of `tokens_per_chunk` and sends chunk `i` of the stream forward
(`num_chunks=None`) through a `cornserve.sidecar.streaming.StreamWriter`, so the consumer (a
talker) starts on the first token's state while the thinker is still generating. `finish` sends
the last, shorter chunk and closes the stream; the request's answer waits for it, so a thinker
response that ended means every hidden state reached the consumer's sidecar.

Backpressure: the writer keeps at most `window` chunks outstanding (sent and not yet marked done by
the consumer), and every chunk also needs room in this executor's sidecar arena until it is
released; so a slow consumer bounds the stream's arena memory, while the rows not yet sent wait
here (at most one per generated token, bounded by `max_tokens`).
"""

from __future__ import annotations

import asyncio
import logging

import torch

from cornserve.llm_executor.errors import GenerationFailed, InvalidRequest
from cornserve.llm_executor.sidecar_errors import sidecar_errors
from cornserve.sidecar import Sidecar
from cornserve.sidecar.streaming import StreamWriter
from cornserve.task.builtins.thinker_talker import HiddenStatesTarget

logger = logging.getLogger(__name__)


class HiddenStateSender:
    """Streams one request's hidden states to the ranks its forward was wired to."""

    def __init__(self, sidecar: Sidecar, target: HiddenStatesTarget, timeout_s: float) -> None:
        forward = target.forward
        if not forward.dst_sidecar_ranks:
            raise InvalidRequest(
                f"cornserve_hidden_states forward {forward.id} names no destination sidecar ranks "
                "(the graph runner wires them; a forward nobody consumes cannot be sent)"
            )
        self.sidecar = sidecar
        self.forward_id = forward.id
        self.dst_ranks = forward.dst_sidecar_ranks
        self.tokens_per_chunk = target.tokens_per_chunk
        self.timeout_s = timeout_s
        self.writer = StreamWriter(
            sidecar, forward.id, forward.dst_sidecar_ranks, window=target.window, timeout=timeout_s
        )
        self.rows_pushed = 0
        self._pending: list[torch.Tensor] = []
        self._queue: asyncio.Queue[torch.Tensor | None] = asyncio.Queue()
        self._closed = False
        self._aborted = False
        self._task = asyncio.create_task(self._run(), name=f"hidden-states-{forward.id}")
        # `finish` raises the task's error; after `abort` nobody awaits it, so it is retrieved here.
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())

    def push(self, row: torch.Tensor) -> None:
        """Queue one token's hidden state (ignored once the stream is being finished)."""
        if self._closed:
            return
        self.rows_pushed += 1
        self._pending.append(row)
        if len(self._pending) >= self.tokens_per_chunk:
            self._queue.put_nowait(torch.stack(self._pending))
            self._pending = []

    async def finish(self) -> None:
        """Send what is left, close the stream and wait until every chunk reached its destinations.

        Raises the send's error as an `ExecutorRequestError` (the request fails: its consumer would
        otherwise wait for states that never come).
        """
        if not self._closed:
            self._closed = True
            if self._pending:
                self._queue.put_nowait(torch.stack(self._pending))
                self._pending = []
            self._queue.put_nowait(None)
        await asyncio.shield(self._task)

    def abort(self) -> None:
        """Stop sending (the request failed or was cancelled); the stream is left unclosed.

        The consumer then fails on its own deadline (or at once, when the dispatcher drops the
        given-up graph's forwards) rather than taking a cut-off stream for a whole one.

        The cancel interrupts a send that waits (for the window, or for arena room); the flag and the
        wake-up stop the task even when the cancel is lost: a send is a NATS request, awaited with
        `asyncio.wait_for`, which on Python 3.11 returns the reply instead of raising when the reply
        lands in the cancel's loop turn, and the task would then wait on its queue forever, never
        abandoning the stream (the talker feed's defect, docs/reliability.md "Early-stop drain").
        """
        self._closed = True
        self._aborted = True
        self._queue.put_nowait(None)
        self._task.cancel()

    @property
    def chunks_sent(self) -> int:
        """Chunks sent so far."""
        return self.writer.sent

    @property
    def waits(self) -> int:
        """Sends that had to wait for the consumer (the window was full)."""
        return self.writer.waits

    async def _run(self) -> None:
        with sidecar_errors(self._timed_out, self._failed, GenerationFailed):
            try:
                while (chunk := await self._queue.get()) is not None and not self._aborted:
                    await self.writer.send(chunk.contiguous())
            except BaseException:
                await asyncio.shield(self.writer.abandon())
                raise
            if self._aborted:  # the cancel was lost in a send: stop all the same, unclosed
                await self.writer.abandon()
                raise asyncio.CancelledError
            await self.writer.close()

    def _timed_out(self) -> str:
        return (
            f"hidden-state chunk {self.chunks_sent} of forward {self.forward_id} could not be sent within "
            f"{self.timeout_s:.1f}s (is the consumer reading the stream? the window of "
            f"{self.writer.window} chunks or the sidecar arena is full)"
        )

    def _failed(self) -> str:
        return f"hidden-state chunk {self.chunks_sent} of forward {self.forward_id} could not be sent"
