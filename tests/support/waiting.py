"""Every wait in the tests has a deadline: poll a condition, a log line or a /health endpoint.

`poll_until` (blocking) and `wait_for` (async) are generic over what they wait for; `wait_healthy`
is `poll_until` on an HTTP health endpoint. Given the process behind the condition, a wait fails at
once with its log when that process exits instead of running into the deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypedDict, Unpack

from tests.support.processes import ServiceProcess

from cornserve.bus.micro import NoResponders, RequestTimeout
from cornserve.runtime.process import pid_alive

HEALTH_DEADLINE_S = 120.0


class ProcessExited(RuntimeError):
    """The process a wait depended on exited first."""


class _Deadline:
    """One wait's deadline: whether to keep polling, the last answer, and the failure to raise."""

    def __init__(self, timeout: float, what: str, process: ServiceProcess | None) -> None:
        self.timeout, self.what, self.process = timeout, what, process
        self.end = time.monotonic() + timeout
        self.last: Any = None

    def pending(self) -> bool:
        """True until the deadline; a process that exited meanwhile fails the wait at once."""
        if self.process is not None and not self.process.running:
            raise ProcessExited(
                f"{self.process.name} exited with {self.process.returncode} while waiting for "
                f"{self.what}:\n{self.process.log()}"
            )
        return time.monotonic() < self.end

    def answer(self, value: Any) -> Any:
        self.last = value
        return value

    def expired(self) -> AssertionError:
        log = f"\n{self.process.name}'s log:\n{self.process.log()}" if self.process is not None else ""
        return AssertionError(
            f"timed out after {self.timeout}s waiting for {self.what} (last: {self.last!r}){log}"
        )


class WaitOptions(TypedDict, total=False):
    """What every wait also takes: the process it depends on, and how often to poll."""

    process: ServiceProcess | None
    interval: float


def poll_until(check: Callable[[], Any], timeout: float, what: str, **options: Unpack[WaitOptions]) -> Any:
    """Call `check` until it returns something truthy (that value is returned), with a deadline."""
    deadline = _Deadline(timeout, what, options.get("process"))
    while deadline.pending():
        if deadline.answer(check()):
            return deadline.last
        time.sleep(options.get("interval", 0.1))
    raise deadline.expired()


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float, what: str, **options: Unpack[WaitOptions]
) -> Any:
    """Await an (async or sync) predicate until it returns something truthy, with a deadline."""
    deadline = _Deadline(timeout, what, options.get("process"))
    while deadline.pending():
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if deadline.answer(value):
            return value
        await asyncio.sleep(options.get("interval", 0.1))
    raise deadline.expired()


async def wait_answering(
    ask: Callable[[], Awaitable[Any]], timeout: float, what: str, **options: Unpack[WaitOptions]
) -> Any:
    """Until a NATS service answers `ask()` (no responders or no reply yet: not up yet); its reply."""

    async def answered() -> Any:
        try:
            return await ask()
        except (NoResponders, RequestTimeout):
            return None

    return await wait_for(answered, timeout, what, **options)


async def wait_gone(pids: list[int], timeout: float = 20.0) -> None:
    """Until none of `pids` is alive (zombies count as gone)."""
    await wait_for(lambda: not [p for p in pids if pid_alive(p)], timeout, f"pids {pids} to exit")


def wait_log(process: ServiceProcess, text: str, timeout: float = 60.0) -> None:
    """Until the process has logged `text`."""
    poll_until(lambda: text in process.log(), timeout, f"{process.name} to log {text!r}", process=process)


def wait_healthy(
    url: str,
    *,
    process: ServiceProcess | None = None,
    path: str = "/health",
    timeout: float = HEALTH_DEADLINE_S,
) -> Any:
    """Poll `GET url+path` until it answers 200; its JSON body (None when it is not JSON)."""
    answer: dict[str, Any] = {}

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + path, timeout=5) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            answer["last"] = f"{exc.code} {exc.read()!r}"
            return False
        except OSError as exc:  # refused, reset, timed out: not up yet
            answer["last"] = repr(exc)
            return False
        try:
            answer["body"] = json.loads(raw)
        except ValueError:
            answer["body"] = None
        return True

    try:
        poll_until(healthy, timeout, f"{url}{path} to answer 200", process=process, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast answer: {answer.get('last')}") from None
    return answer["body"]
