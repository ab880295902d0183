"""The fault-matrix and soak harness: a supervised local cluster, a steady invocation load, and the faults.

Every request of the load ends as one of:

- ok: 200 with the right answer;
- clean error: an HTTP error with the gateway's JSON error body (`{"error", "message"}`), or a
  refused/reset connection while the gateway itself is down (the client learns at once);
- hung: no answer within `HUNG_AFTER_S` (must never happen);
- wrong / unclean: a wrong answer, or an error without the error shape (must never happen).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from tests.control.apps import PIPELINE_APP
from tests.control.support import call, ensure_tasklib, expected_sum
from tests.support.cluster import ProcessCluster, gateway_session

from cornserve.cli.launcher import LocalCluster
from cornserve.runtime.process import pid_alive

MIN_REQUESTS = 200
"""Requests per fault (the issue's "a load of at least 200 requests")."""
CONCURRENCY = 6
INJECT_AFTER = 40
"""Completed requests before the fault: the load is steady when it hits."""
STEADY_TAIL = 20
"""Consecutive successes (by start time) that count as recovered."""
REQUEST_TIMEOUT_S = 20.0
"""The gateway's --request-timeout in this cluster: every request ends by then (504 at worst)."""
HUNG_AFTER_S = REQUEST_TIMEOUT_S + 15.0
"""A request with no answer by then is hung."""
RECOVERY_BUDGET_S = 150.0
"""How long the load keeps going after a fault for the cluster to recover."""
N = 8
ERROR_BACKOFF_S = 0.2
"""A client backs off this long after an error before its next request (as real clients do)."""


@dataclass
class Sample:
    """One request: when it started and ended (monotonic seconds) and how it ended."""

    start: float
    end: float
    outcome: str  # "ok", "error", "hung"
    detail: str


@dataclass
class FaultResult:
    """One row of the matrix."""

    fault: str
    requests: int
    ok: int
    clean_error: int
    hung: int
    recovery_s: float | None
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class Matrix:
    """The cluster under test, its supervisor, and every data-plane pid seen (for the leak check)."""

    local: LocalCluster
    said: list[str]
    seen_pids: set[int] = field(default_factory=set)


@contextmanager
def supervised_cluster(root: Path) -> Iterator[Matrix]:
    """A local cluster serving the pipeline app, supervised as `cornserve up` does; afterwards no
    process it ran (services, task managers, executors) and no shared memory may be left."""
    said: list[str] = []
    saved = os.environ.get("CORNSERVE_REQUEST_TIMEOUT")
    os.environ["CORNSERVE_REQUEST_TIMEOUT"] = str(REQUEST_TIMEOUT_S)
    try:
        with ProcessCluster(root / "logs") as processes:
            local = processes.start_local(root / "state", cpu_slots=4, dispatchers=2)
            local.say = said.append
            state = Matrix(local, said)
            asyncio.run(_register(local))
            stop = threading.Event()
            verdict: list[int] = []
            supervisor = threading.Thread(
                target=lambda: verdict.append(local.supervise(stop.is_set, max_restarts=20, poll_s=0.2))
            )
            supervisor.start()
            try:
                yield state
            finally:
                stop.set()
                supervisor.join(timeout=60)
                asyncio.run(collect_pids(state))
            assert verdict == [0], "\n".join(said)
        leaked = sorted(pid for pid in state.seen_pids if pid_alive(pid))
        assert not leaked, f"processes outlived the cluster: {leaked}"
        assert not list(Path("/dev/shm").glob(f"cornserve-sidecar-{local.node}-*"))
    finally:
        if saved is None:
            os.environ.pop("CORNSERVE_REQUEST_TIMEOUT", None)
        else:
            os.environ["CORNSERVE_REQUEST_TIMEOUT"] = saved


async def _register(local: LocalCluster) -> None:
    async with gateway_session(local, timeout_s=300) as http:
        await ensure_tasklib(http)
        status, body = await call(http, "POST", "/apps", {"name": "pipeline", "source": PIPELINE_APP})
        assert status == 201, body


async def _tasks(local: LocalCluster) -> list[dict[str, Any]]:
    async with gateway_session(local, timeout_s=30) as http:
        status, body = await call(http, "GET", "/tasks")
    assert status == 200, body
    return list(body["tasks"])


async def collect_pids(state: Matrix) -> None:
    """Remember every task-manager and executor pid the cluster reports now."""
    try:
        tasks = await _tasks(state.local)
    except (aiohttp.ClientError, TimeoutError, AssertionError):
        return  # the cluster is going down; the pids seen before are checked
    for task in tasks:
        for ex in task["executors"]:
            if ex.get("pid"):
                state.seen_pids.add(int(ex["pid"]))
    for pid in await _task_manager_pids(state.local):
        state.seen_pids.add(pid)


async def _task_manager_pids(local: LocalCluster) -> list[int]:
    """Task managers are the resource manager's children's process-group leaders: read their pids
    from /proc (children of the resource manager named cornserve.task_manager)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cornserve.task_manager.main" in cmdline and any(
            str(local.state_dir).encode() in part for part in cmdline
        ):
            pids.append(int(entry.name))
    return pids


def _child_pid(local: LocalCluster, name: str) -> int:
    child = next(c for c in local.children if c.name == name)
    assert child.proc is not None
    return child.proc.pid


async def _kill_executor(state: Matrix) -> str:
    tasks = await _tasks(state.local)
    ex = next(e for t in tasks if t["task"] == "MatMul" for e in t["executors"] if e.get("pid"))
    os.kill(int(ex["pid"]), signal.SIGKILL)
    return f"executor {ex['executor_id']} (pid {ex['pid']})"


async def _kill_task_manager(state: Matrix) -> str:
    pids = await _task_manager_pids(state.local)
    assert pids, "no task manager process found"
    os.kill(pids[0], signal.SIGKILL)
    return f"task manager pid {pids[0]}"


async def _kill_sidecar(state: Matrix) -> str:
    tasks = await _tasks(state.local)
    rank = next(r for t in tasks if t["task"] == "MatMul" for e in t["executors"] for r in e["sidecar_ranks"])
    pid = _child_pid(state.local, f"sidecar-{rank}")
    os.kill(pid, signal.SIGKILL)
    return f"sidecar rank {rank} (pid {pid})"


def _kill_child(name: str) -> Callable[[Matrix], Awaitable[str]]:
    async def kill(state: Matrix) -> str:
        pid = _child_pid(state.local, name)
        os.kill(pid, signal.SIGKILL)
        return f"{name} (pid {pid})"

    return kill


async def _restart_nats(state: Matrix) -> str:
    assert state.local.nats is not None
    state.local.nats.kill()  # the supervisor starts it again (same port, store and credentials)
    return "nats-server (kill -9; the supervisor restarts it)"


FAULTS: dict[str, Callable[[Matrix], Awaitable[str]]] = {
    "executor": _kill_executor,
    "task-manager": _kill_task_manager,
    "sidecar": _kill_sidecar,
    "dispatcher": _kill_child("dispatcher-0"),
    "resource-manager": _kill_child("resource-manager"),
    "gateway": _kill_child("gateway"),
    "nats": _restart_nats,
}


async def one_request(http: aiohttp.ClientSession, seed: int) -> tuple[str, str]:
    """One invocation: ("ok" | "error" | "wrong" | "unclean" | "hung", detail)."""
    try:
        async with asyncio.timeout(HUNG_AFTER_S):
            async with http.post("/apps/pipeline/invoke", json={"seed": seed, "n": N}) as response:
                text = await response.text()
                status = response.status
    except TimeoutError:
        return "hung", f"no answer in {HUNG_AFTER_S:.0f} s"
    except aiohttp.ClientConnectionError as exc:
        await asyncio.sleep(ERROR_BACKOFF_S)  # the gateway is down: the client knows at once
        return "error", f"connection: {type(exc).__name__}"
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return "unclean", f"{status} with a body that is not JSON: {text[:80]!r}"
    if status == 200:
        if abs(body.get("sum", float("nan")) - expected_sum(seed, N)) <= 1e-3 * max(
            1.0, abs(expected_sum(seed, N))
        ):
            return "ok", "200"
        return "wrong", f"200 with a wrong answer: {text[:80]!r}"
    if isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str):
        await asyncio.sleep(ERROR_BACKOFF_S)
        return "error", f"{status} {body['error']}"
    return "unclean", f"{status} without the error shape: {text[:80]!r}"


def recovery(samples: list[Sample], fault_at: float) -> float | None:
    """Seconds from the fault to the start of the first request after which all succeeded."""
    after = sorted((s for s in samples if s.start >= fault_at), key=lambda s: s.start)
    if len(after) < STEADY_TAIL or any(s.outcome != "ok" for s in after[-STEADY_TAIL:]):
        return None
    first_good = len(after)
    while first_good > 0 and after[first_good - 1].outcome == "ok":
        first_good -= 1
    return 0.0 if first_good == 0 else after[first_good].start - fault_at


async def run_fault(state: Matrix, fault: str, seed_base: int) -> tuple[FaultResult, str]:
    await until_whole(state)
    samples: list[Sample] = []
    fault_at: float | None = None
    seeds = iter(range(seed_base, seed_base + 1_000_000))

    def done() -> bool:
        if fault_at is None:
            return False
        if time.monotonic() - fault_at > RECOVERY_BUDGET_S:
            return True
        return len(samples) >= MIN_REQUESTS and recovery(samples, fault_at) is not None

    async with gateway_session(state.local, timeout_s=HUNG_AFTER_S + 10) as http:

        async def worker() -> None:
            while not done():
                seed = next(seeds)
                start = time.monotonic()
                outcome, detail = await one_request(http, seed)
                samples.append(Sample(start, time.monotonic(), outcome, detail))

        workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
        try:
            async with asyncio.timeout(120):
                while len(samples) < INJECT_AFTER:
                    await asyncio.sleep(0.05)
            assert all(s.outcome == "ok" for s in samples), Counter(s.detail for s in samples)
            fault_at = time.monotonic()
            what = await FAULTS[fault](state)
            async with asyncio.timeout(RECOVERY_BUDGET_S + HUNG_AFTER_S + 30):
                await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
    assert fault_at is not None
    outcomes = Counter(s.outcome for s in samples)
    errors = Counter(s.detail for s in samples if s.outcome != "ok")
    result = FaultResult(
        fault=fault,
        requests=len(samples),
        ok=outcomes["ok"],
        clean_error=outcomes["error"],
        hung=outcomes["hung"],
        recovery_s=recovery(samples, fault_at),
        errors=dict(errors),
    )
    return result, what


async def service_processes(state: Matrix) -> dict[str, int]:
    """Every process of the cluster by name: the services `up` runs, task managers and executors."""
    named = {c.name: c.proc.pid for c in state.local.children if c.proc is not None}
    for pid in await _task_manager_pids(state.local):
        named[f"task-manager-{pid}"] = pid
    for task in await _tasks(state.local):
        for ex in task["executors"]:
            if ex.get("pid"):
                named[f"executor-{task['task']}-{ex['executor_id']}"] = int(ex["pid"])
    return named


def rss_and_fds(pid: int) -> tuple[int, int] | None:
    """(resident set size in bytes, open file descriptors) of a live process; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024, fds
    return None


SETTLE_S = 5.0
"""After every child runs again and every executor is ready, time for restarted services to catch up."""


async def until_whole(state: Matrix, timeout_s: float = 180.0) -> None:
    """Wait until the cluster is whole again: every service `up` runs is alive (the supervisor
    restarted what a fault killed), every executor is ready, then `SETTLE_S` more. Each fault is
    then measured on its own, not on top of the previous one's recovery."""
    deadline = time.monotonic() + timeout_s
    while True:
        children_up = all(c.proc is not None and pid_alive(c.proc.pid) for c in state.local.children)
        nats_up = state.local.nats is None or state.local.nats.running
        try:
            tasks = await _tasks(state.local) if children_up and nats_up else []
        except (aiohttp.ClientError, TimeoutError, AssertionError):
            tasks = []
        if tasks and all(ex["state"] == "ready" for t in tasks for ex in t["executors"]):
            await asyncio.sleep(SETTLE_S)
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the cluster was not whole again within {timeout_s:.0f} s: {tasks}")
        await asyncio.sleep(0.5)
