"""Dynamic batching of same-modality items onto one encoder.

Items of one request are queued together, so they form one batch (up to `max_batch_size`); items
of requests that arrive while a batch is running wait and go together in the next one. The model
runs on a single worker thread, so the event loop stays free to accept and preprocess requests;
a batch predicted to be short runs on the loop instead when the batcher is given an `InlineCost`
(`cornserve.models.inline`: Eric on one CPU thread).

The items admitted (being fetched, queued, encoded or sent) are bounded by `max_pending`: a request
that would go beyond it is refused at once (`QueueFull`, answered 429 with `Retry-After`) instead of
waiting behind an ever longer queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import BaseModel

from cornserve.models.encoders import EncodedItem, Preprocessed
from cornserve.models.inline import InlineCost, timed

logger = logging.getLogger(__name__)

EncodeFn = Callable[[list[Preprocessed]], list[EncodedItem]]

YIELDS_AFTER_INLINE = 8
"""Event-loop iterations run after a batch encoded on the loop, before the next batch starts.

The batch's requests go on to send their embeddings, and requests that arrived meanwhile are read
and queued (so they can join the next batch); an HTTP exchange is a chain of callbacks, one
iteration each. The LLM executor lets its loop run as many between two inline decode steps.
"""


class BatchStats(BaseModel):
    """Counters shown in `/info`: how batching actually went."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    recent_batch_sizes: list[int] = []
    dropped: int = 0
    """Queued items whose request was cancelled (its caller hung up) before they were encoded."""


class QueueFull(Exception):
    """Admitting a request would take the pending items beyond `max_pending`."""

    def __init__(self, pending: int, adding: int, limit: int) -> None:
        super().__init__(
            f"{pending} media item(s) are pending, the limit is {limit} (--max-pending); "
            f"{adding} more cannot be admitted now, retry later"
        )
        self.pending = pending
        self.limit = limit


@dataclass
class _Job:
    item: Preprocessed
    future: asyncio.Future[EncodedItem]


class DynamicBatcher:
    """Collects queued items into batches of at most `max_batch_size` and encodes them in order."""

    def __init__(
        self,
        encode: EncodeFn,
        max_batch_size: int,
        max_pending: int = 256,
        *,
        inline: InlineCost | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._encode = encode
        self._inline = inline
        """Decides which batches run on the loop (None: every batch runs on the worker thread)."""
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.pending = 0
        """Items admitted and not finished yet (see `admit`)."""
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eric-encode")
        self._task: asyncio.Task[None] | None = None
        self._recent: deque[int] = deque(maxlen=32)
        self.stats = BatchStats()

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="eric-batcher")

    async def stop(self) -> None:
        """Stop the loop; queued items fail with CancelledError-free RuntimeErrors."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("Eric is shutting down"))
        self._pool.shutdown(wait=True, cancel_futures=True)

    def reserve(self, count: int) -> None:
        """Count `count` items as pending (until `release`), or raise QueueFull at once.

        A request larger than `max_pending` is still admitted when nothing else is pending, so it
        is never refused forever.
        """
        if self.pending and self.pending + count > self.max_pending:
            raise QueueFull(self.pending, count, self.max_pending)
        self.pending += count

    def release(self, count: int) -> None:
        """The `count` items of one `reserve` are done (answered, failed or cancelled)."""
        self.pending -= count

    async def encode(self, items: list[Preprocessed]) -> list[EncodedItem]:
        """Queue `items` together and wait for their embeddings (in order)."""
        if self._task is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        jobs = [_Job(item, loop.create_future()) for item in items]
        for job in jobs:
            self._queue.put_nowait(job)
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [job for job in batch if not job.future.done()]  # done: the request was cancelled
            if len(live) < len(batch):
                self.stats = self.stats.model_copy(
                    update={"dropped": self.stats.dropped + len(batch) - len(live)}
                )
                logger.debug("dropped %d queued item(s) of cancelled requests", len(batch) - len(live))
            batch = live
            if not batch:
                continue
            self._record(len(batch))
            items = [job.item for job in batch]
            units = sum(int(item.pixels.shape[0]) for item in items)
            inline = self._inline is not None and self._inline.runs_inline(units)
            try:
                if inline:
                    results, seconds = timed(self._encode, items)
                else:
                    results, seconds = await loop.run_in_executor(self._pool, timed, self._encode, items)
            except Exception as exc:
                logger.exception("encoding a batch of %d items failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            if self._inline is not None:
                self._inline.record(units, seconds, inline=inline)
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
            if inline:
                for _ in range(YIELDS_AFTER_INLINE):
                    await asyncio.sleep(0)

    def _record(self, size: int) -> None:
        self._recent.append(size)
        self.stats = BatchStats(
            batches=self.stats.batches + 1,
            items=self.stats.items + size,
            largest_batch=max(self.stats.largest_batch, size),
            recent_batch_sizes=list(self._recent),
            dropped=self.stats.dropped,
        )
        logger.debug("encoding a batch of %d items", size)
