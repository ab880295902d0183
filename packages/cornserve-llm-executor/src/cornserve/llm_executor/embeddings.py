"""Receiving encoder embeddings through the sidecar (see docs/executors.md, "Embedding hand-off").

Each forward has two chunks (`cornserve.task.builtins.embedding`): the `[num_tokens, hidden]`
tensor in the LLM's dtype and its `EmbeddingMeta` as a dict (naming that dtype). Both are copied out
of the arena and marked done right away, so the sidecar can reuse the memory while the request is
still generating. Once both chunks are copied, marking them done (one sidecar round trip each) runs
in the background: the request's prefill does not wait for it (it was ~2 ms of every fission
request's time to first token, docs/performance.md). A receive that fails or is cancelled still
releases what it got before it returns.

The two chunks are received concurrently: the encoder sends them at once, and one after the other
cost a second round trip to this executor's sidecar (~1.5 ms of every fission request's time to
first token, docs/performance.md).

A receive can be a NATS request, which nats-py awaits with `asyncio.wait_for`: on Python 3.11 a
cancel that lands in the loop turn in which the reply arrives is swallowed (the reply is returned).
The task's cancel count still says it was asked, so once both chunks are in, a request whose cancel
was lost raises it itself instead of going on to its prefill (as the dispatcher and gateway do
with their NATS waits).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from cornserve.llm_executor.errors import EmbeddingError
from cornserve.llm_executor.sidecar_errors import sidecar_errors
from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import SidecarError
from cornserve.task.builtins.embedding import EMBEDDING_META_CHUNK, EMBEDDING_TENSOR_CHUNK, EmbeddingMeta
from cornserve.task.forward import DataForward, Tensor

logger = logging.getLogger(__name__)

ALL_CHUNKS = (EMBEDDING_TENSOR_CHUNK, EMBEDDING_META_CHUNK)
ABANDON_TIMEOUT_S = 2.0
"""Bound on releasing a cancelled request's delivered chunks (its handler is already cancelled)."""
CLOSE_TIMEOUT_S = 5.0
"""Bound on the background releases still running when the executor stops."""


@dataclass
class ReceivedEmbedding:
    """One media item's embedding, copied out of the sidecar."""

    forward_id: str
    meta: EmbeddingMeta
    tensor: torch.Tensor


class EmbeddingReceiver:
    """Receives a request's embedding forwards on this executor's sidecar rank."""

    def __init__(self, sidecar: Sidecar, timeout_s: float) -> None:
        self.sidecar = sidecar
        self.timeout_s = timeout_s
        self._releasing: set[asyncio.Task[None]] = set()
        """Background releases of received chunks (kept referenced until they finish)."""

    async def close(self) -> None:
        """Wait (bounded) for the background releases, so the chunks are freed before the sidecar client closes."""
        if not self._releasing:
            return
        _, pending = await asyncio.wait(set(self._releasing), timeout=CLOSE_TIMEOUT_S)
        if pending:
            logger.warning(
                "%d chunk release(s) still running after %g s at shutdown; the sidecar's TTL frees them",
                len(pending),
                CLOSE_TIMEOUT_S,
            )
            for task in pending:
                task.cancel()

    def _release_later(self, fid: str, chunks: list[int]) -> None:
        """Mark `chunks` of `fid` done in the background (a failure is logged, never dropped silently)."""
        task = asyncio.create_task(self._release(fid, chunks), name=f"release-{fid}")
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("releasing received embedding chunks failed", exc_info=exc)

    async def receive_all(self, forwards: list[DataForward[Tensor]]) -> list[ReceivedEmbedding]:
        """Receive every forward (concurrently), in order; the first failure is raised after all settle."""
        results = await asyncio.gather(*(self._receive(f) for f in forwards), return_exceptions=True)
        received: list[ReceivedEmbedding] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            received.append(result)
        return received

    async def _receive(self, forward: DataForward[Tensor]) -> ReceivedEmbedding:
        fid = forward.id
        if forward.dst_sidecar_ranks is not None and not any(
            self.sidecar.rank in group for group in forward.dst_sidecar_ranks
        ):
            logger.warning(
                "embedding forward %s lists destinations %s, not this executor's rank %d; waiting for it anyway",
                fid,
                forward.dst_sidecar_ranks,
                self.sidecar.rank,
            )
        got: list[int] = []
        data: Any = None
        raw_meta: Any = None
        timed_out = (
            f"embedding forward {fid} did not arrive through sidecar rank {self.sidecar.rank} within "
            f"{self.timeout_s:.1f}s (did the encoder task run and send it to this rank?)"
        )
        received_all = False
        cancels = _cancels()
        with sidecar_errors(timed_out, f"embedding forward {fid} could not be received"):
            try:
                async with asyncio.timeout(self.timeout_s + 5.0):
                    data, raw_meta = await self._receive_chunks(fid, got)
                    _raise_lost_cancel(cancels)
                    received_all = True
            except asyncio.CancelledError:
                # The request was cancelled (its caller hung up): chunks the encoder already delivered
                # here are released now rather than at the sidecar's TTL.
                await self._release_abandoned(fid, [c for c in ALL_CHUNKS if c not in got])
                raise
            finally:
                if received_all:  # both copied: the prefill need not wait for the release
                    self._release_later(fid, got)
                else:
                    await self._release(fid, got)
        try:
            meta = EmbeddingMeta.model_validate(raw_meta)
        except ValidationError as exc:
            raise EmbeddingError(
                f"embedding forward {fid} has malformed metadata (chunk {EMBEDDING_META_CHUNK}): {exc}"
            ) from exc
        if not isinstance(data, torch.Tensor) or data.ndim != 2:
            raise EmbeddingError(
                f"embedding forward {fid} chunk {EMBEDDING_TENSOR_CHUNK} must be a 2-D tensor [num_tokens, hidden], got "
                f"{type(data).__name__} {getattr(data, 'shape', '')}"
            )
        if str(data.dtype).removeprefix("torch.") != meta.dtype:
            raise EmbeddingError(
                f"embedding forward {fid} chunk {EMBEDDING_TENSOR_CHUNK} is {data.dtype} but its metadata says "
                f"{meta.dtype}"
            )
        # Kept in the dtype it travelled in (the LLM's); the engine casts it where it splices it in.
        return ReceivedEmbedding(forward_id=fid, meta=meta, tensor=data)

    async def _receive_chunks(self, fid: str, got: list[int]) -> tuple[Any, Any]:
        """Both chunks of `fid`, received at once (the encoder sends them at once).

        Each chunk is appended to `got` as it arrives. When one fails, or the caller is cancelled,
        the other receive is cancelled and awaited before this returns, so `got` is final for the
        release.
        """

        async def one(chunk: int) -> Any:
            value = await self.sidecar.recv(fid, chunk, timeout=self.timeout_s, copy=True)
            got.append(chunk)
            return value

        receives = [asyncio.ensure_future(one(chunk)) for chunk in ALL_CHUNKS]
        try:
            data, raw_meta = await asyncio.gather(*receives)
        finally:
            pending = [receive for receive in receives if not receive.done()]
            for receive in pending:
                receive.cancel()
            if pending:  # settled, not raised: the first failure (or the cancel) is already propagating
                await asyncio.wait(pending)  # each receive is bounded by its own timeout
        return data, raw_meta

    async def _release_abandoned(self, fid: str, chunks: list[int]) -> None:
        """Mark done the chunks of a cancelled request that were not received (bounded, best effort).

        A chunk already delivered to this rank is freed; one not delivered yet is refused by the
        sidecar (nothing to free now) and left to its TTL.
        """
        try:
            async with asyncio.timeout(ABANDON_TIMEOUT_S):
                for chunk in chunks:
                    try:
                        await self.sidecar.mark_done(fid, chunk)
                    except SidecarError as exc:
                        logger.debug("chunk %d of cancelled forward %s not released: %s", chunk, fid, exc)
        except TimeoutError:
            logger.info("releasing the chunks of cancelled forward %s took over %g s", fid, ABANDON_TIMEOUT_S)

    async def _release(self, fid: str, chunks: list[int]) -> None:
        """Mark the received chunks done, all at once; a chunk that never arrived is expired by the sidecar's TTL."""
        await asyncio.gather(*(self._release_one(fid, chunk) for chunk in chunks))

    async def _release_one(self, fid: str, chunk: int) -> None:
        try:
            await self.sidecar.mark_done(fid, chunk)
        except SidecarError as exc:
            logger.warning("could not mark chunk %d of forward %s done: %s", chunk, fid, exc)


def _cancels() -> int:
    """How many cancels of the current task are pending (`Task.cancelling`)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _raise_lost_cancel(since: int) -> None:
    """Raise the cancel asked of this task after `since` that an awaited `wait_for` swallowed."""
    if _cancels() > since:
        raise asyncio.CancelledError
