"""A bounded thread pool for loading media, apart from an executor's compute thread.

Why its own pool: fetching a URL and decoding a video block a thread for up to the media deadline.
On a shared pool (asyncio's default executor, which the LLM executor's decode steps also use) a burst
of slow media requests would take every thread and stall generation for everyone. Here at most
`media_workers` items load at once and at most `media_queue` more wait; past that a request gets
`MediaBusyError` (503) at once instead of queueing without bound. An item's deadline starts when it
is submitted, so time spent waiting for a thread counts against it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from cornserve.models.media import load_media
from cornserve.models.media_errors import MediaBusyError, MediaTimeoutError, shorten_url
from cornserve.models.media_policy import MediaPolicy

_BACKSTOP_S = 1.0
"""How long past the deadline the awaiting side waits for a media thread before giving up on it."""


class MediaPool:
    """Loads media items (`load_media`) on a few threads of its own, admitting a bounded number."""

    def __init__(self, policy: MediaPolicy, *, name: str = "media") -> None:
        self.policy = policy
        self.capacity = policy.media_workers + policy.media_queue
        self._executor = ThreadPoolExecutor(max_workers=policy.media_workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Items loading or waiting for a thread now."""
        with self._lock:
            return self._admitted

    def _release(self, _future: Future[Any]) -> None:
        with self._lock:
            self._admitted -= 1

    def _run(self, url: str, modality: str, deadline_at: float) -> Any:
        left = deadline_at - time.monotonic()
        if left <= 0:
            raise MediaTimeoutError(
                f"{shorten_url(url)!r} waited for a media thread past the media deadline of "
                f"{self.policy.media_timeout_s:g}s",
                url,
            )
        return load_media(url, modality, self.policy, timeout_s=left)

    async def load(self, url: str, modality: str) -> Any:
        """`load_media(url, modality)` under this pool's policy; raises `MediaError`s (busy: 503)."""
        timeout = self.policy.media_timeout_s
        with self._lock:
            if self._admitted >= self.capacity:
                raise MediaBusyError(
                    f"the executor is loading {self._admitted} media items already (its limit); "
                    f"retry {shorten_url(url)!r} later",
                    url,
                )
            self._admitted += 1
        try:
            future = self._executor.submit(self._run, url, modality, time.monotonic() + timeout)
        except BaseException:
            with self._lock:
                self._admitted -= 1
            raise
        future.add_done_callback(self._release)
        try:
            async with asyncio.timeout(timeout + _BACKSTOP_S):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            raise MediaTimeoutError(
                f"loading {shorten_url(url)!r} took over the media deadline of {timeout:g}s", url
            ) from None

    def close(self) -> None:
        """Stop: items not started are cancelled; running ones finish by their deadline on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
