"""Loading an app's source off the event loop, with a time limit.

`validate_app` executes the app's module code. Run on the event loop, a source that loops (or
sleeps) at import would stop the whole gateway; so it runs in its own daemon thread and the
caller waits at most `timeout_s`. Python cannot stop a thread, so a source that never finishes
keeps its thread (and a CPU share) until the gateway exits; a daemon thread at least never keeps
the process from exiting. To bound the damage, at most `max_running` loads may be in progress at
once (counting those that already timed out but are still running); another is refused with 503
until one finishes. A subprocess would be killable, but the gateway needs the app's objects (its
`serve` function and task instances) in its own process, so the source would still have to be
executed here afterwards: the subprocess would add cost without removing the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

from cornserve.gateway.errors import HTTPError

T = TypeVar("T")


class AppLoader:
    """Runs app-loading functions in daemon threads with a deadline and a bound on concurrency."""

    def __init__(self, timeout_s: float = 30.0, max_running: int = 2) -> None:
        if timeout_s <= 0 or max_running < 1:
            raise ValueError("timeout_s must be > 0 and max_running >= 1")
        self.timeout_s = timeout_s
        self.max_running = max_running
        self._running = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        """Loads whose thread is still running (including ones the caller stopped waiting for)."""
        with self._lock:
            return self._running

    async def run(self, fn: Callable[[], T], what: str) -> T:
        """`fn()` in a daemon thread; 503 when too many loads run, 422 past the deadline.

        Exceptions raised by `fn` are re-raised here unchanged.
        """
        with self._lock:
            if self._running >= self.max_running:
                raise HTTPError(
                    503,
                    "app_loader_busy",
                    f"{self._running} app source load(s) are still running (at most {self.max_running} at "
                    "once; a source that never finishes loading holds its slot until the gateway restarts); "
                    "retry later",
                    headers={"Retry-After": "5"},
                )
            self._running += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            result: T | None = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # handed to the waiting coroutine, re-raised there
                error = exc
            finally:
                with self._lock:
                    self._running -= 1
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name=f"app-load-{what}", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            raise HTTPError(
                422,
                "app_load_timeout",
                f"{what} did not finish loading within {self.timeout_s:g} s (module-level code must not "
                "loop, block or do long work; move it into `serve`). Its thread keeps running until the "
                "gateway restarts",
            ) from None
