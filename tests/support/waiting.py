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
from typing import Any

from tests.support.processes import ServiceProcess

from cornserve.cli.launcher import pid_alive

HEALTH_DEADLINE_S = 120.0


class ProcessExited(RuntimeError):
    """The process a wait depended on exited first."""


def _check_alive(process: ServiceProcess | None, what: str) -> None:
    if process is not None and not process.running:
        raise ProcessExited(
            f"{process.name} exited with {process.returncode} while waiting for {what}:\n{process.log()}"
        )


def _timed_out(timeout: float, what: str, last: Any, process: ServiceProcess | None) -> AssertionError:
    log = f"\n{process.name}'s log:\n{process.log()}" if process is not None else ""
    return AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}){log}")


def poll_until(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    process: ServiceProcess | None = None,
    interval: float = 0.1,
) -> Any:
    """Call `check` until it returns something truthy (that value is returned), with a deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        _check_alive(process, what)
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise _timed_out(timeout, what, last, process)


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float,
    what: str,
    *,
    process: ServiceProcess | None = None,
    interval: float = 0.1,
) -> Any:
    """Await an (async or sync) predicate until it returns something truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        _check_alive(process, what)
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise _timed_out(timeout, what, last, process)


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
