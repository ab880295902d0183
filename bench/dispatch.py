"""Benchmark: a two-stage graph through the Cornserve gateway vs the same pipeline on Ray Serve.

The pipeline: a producer makes a 4 KiB float32 tensor (`arange(1024) + seed % 1000`) and hands it
to a consumer, which returns its sum; the HTTP response is `{"sum": ...}`. In one run:

- **Cornserve**: a local cluster (`LocalCluster`, what `cornserve up` runs: NATS, one sidecar per
  CPU slot, resource manager, dispatchers, gateway) with the task library `bench/dispatch_tasklib.py`
  uploaded and a two-stage app registered; `POST /apps/dispatch-two-stage/invoke` goes gateway →
  dispatcher (NATS) → producer and consumer executors (HTTP), the tensor through the sidecar.
  Also (for interpretation) a one-stage app whose single executor does both steps.
- **Floor**: `POST /invoke` straight to that one-stage executor (no gateway, no dispatcher, no forward).
- **Ray Serve** (`bench/dispatch_ray.py`, a child process): Serve's HTTP proxy → Producer deployment
  → Consumer deployment through a deployment handle, the tensor as the call's argument.

Every system runs alone (Cornserve's cluster is stopped before Ray starts) and is measured by the
same aiohttp client: warm-up, then p50/p99 latency of sequential requests (concurrency 1), then
requests/s with `--concurrency` requests in flight. Every response's sum is checked; failures are
counted and printed, never dropped.

    uv run --group bench python bench/dispatch.py [--requests N] [--concurrency 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cornserve.cli.launcher import LocalCluster
from cornserve.client import CornserveClient
from cornserve.runtime.process import free_port

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from dispatch_tasklib import PIPELINE_APP, SINGLE_APP, expected_sum  # noqa: E402

logger = logging.getLogger("bench.dispatch")

TASKLIB_NAME = "dispatch-bench"
TWO_STAGE_APP = "dispatch-two-stage"
ONE_STAGE_APP = "dispatch-one-stage"
REQUEST_TIMEOUT_S = 60.0
MAX_PRINTED_ERRORS = 10

CORNSERVE = "Cornserve (gateway → producer → sidecar → consumer)"
CORNSERVE_ONE = "Cornserve, one stage (gateway → 1 executor, no forward)"
RAY = "Ray Serve (proxy → producer → handle → consumer)"
FLOOR = "Floor: direct HTTP to one executor"


# ----- the load client (one implementation for every system) ---------------------------------------


@dataclass
class Target:
    """Where to POST, and the JSON body for a given seed; every reply is `{"sum": ...}`."""

    name: str
    url: str
    body: Callable[[int], Any]
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with every request (the gateway's bearer token)."""


@dataclass
class Result:
    """One system's measurements."""

    name: str
    latencies_s: list[float] = field(default_factory=list)
    throughput_rps: float = 0.0
    throughput_ok: int = 0
    errors: list[str] = field(default_factory=list)
    note: str = ""

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the successful concurrency-1 latencies, in ms (nan if none)."""
        if not self.latencies_s:
            return math.nan
        ordered = sorted(self.latencies_s)
        return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))] * 1e3


async def call_once(http: aiohttp.ClientSession, target: Target, seed: int) -> str | None:
    """One request; None when the reply is 200 with the right sum, else a description of the failure."""
    try:
        async with http.post(target.url, json=target.body(seed), headers=target.headers) as response:
            text = await response.text()
            if response.status != 200:
                return f"HTTP {response.status}: {text[:300]}"
        value = json.loads(text)["sum"]
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"bad reply ({type(exc).__name__}: {exc}): {text[:300]}"
    want = expected_sum(seed)
    if not isinstance(value, (int, float)) or abs(value - want) > 1e-3:
        return f"wrong sum for seed {seed}: got {value!r}, expected {want}"
    return None


async def run_concurrent(
    http: aiohttp.ClientSession, target: Target, seeds: range, concurrency: int, errors: list[str]
) -> int:
    """Send every seed with `concurrency` requests in flight; returns how many succeeded."""
    pending = iter(seeds)
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for seed in pending:
            error = await call_once(http, target, seed)
            if error is None:
                ok += 1
            else:
                errors.append(error)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


async def measure(target: Target, requests: int, concurrency: int, warmup: int) -> Result:
    """Warm up, then latency at concurrency 1, then throughput at `concurrency`."""
    result = Result(target.name)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        logger.info("%s: warm-up (%d requests)", target.name, warmup)
        warm_errors: list[str] = []
        await run_concurrent(http, target, range(10_000, 10_000 + warmup), concurrency, warm_errors)
        result.errors += [f"warm-up: {e}" for e in warm_errors]

        logger.info("%s: %d sequential requests", target.name, requests)
        for seed in range(requests):
            start = time.perf_counter()
            error = await call_once(http, target, seed)
            elapsed = time.perf_counter() - start
            if error is None:
                result.latencies_s.append(elapsed)
            else:
                result.errors.append(error)

        logger.info("%s: %d requests at concurrency %d", target.name, requests, concurrency)
        start = time.perf_counter()
        result.throughput_ok = await run_concurrent(
            http, target, range(requests, 2 * requests), concurrency, result.errors
        )
        result.throughput_rps = result.throughput_ok / (time.perf_counter() - start)
    logger.info(
        "%s: p50 %.2f ms, p99 %.2f ms, %.1f req/s, %d error(s)",
        target.name,
        result.percentile_ms(0.50),
        result.percentile_ms(0.99),
        result.throughput_rps,
        len(result.errors),
    )
    return result


# ----- Cornserve ---------------------------------------------------------------------------------


async def register_app(client: CornserveClient, name: str, source: str) -> dict[str, Any]:
    """Register an app and wait for its tasks to be deployed; the final event is the app."""
    last: dict[str, Any] = {}
    async for event in client.register_app(name, source):
        last = event.model_dump(mode="json")
        logger.info("  %s: %s", name, {k: v for k, v in last.items() if k != "tasks"})
    if last.get("state") != "ready":
        raise RuntimeError(f"app {name} did not become ready; last event: {last}")
    return last


async def floor_target(client: CornserveClient) -> Target:
    """A direct `POST /invoke` to the one-stage app's executor, with the invocation JSON it expects."""
    tasks = (await client.list_tasks()).tasks
    deployment = next((t for t in tasks if t.task == "BenchProduceSum"), None)
    if deployment is None or not deployment.executors:
        raise RuntimeError(f"no BenchProduceSum executor among the deployed tasks: {tasks}")
    base = deployment.executors[0].url.rstrip("/")
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        http.get(base + "/info") as response,
    ):
        response.raise_for_status()
        task = (await response.json())["task"]

    def body(seed: int) -> dict[str, Any]:
        # A recorded invocation as the dispatcher would send it (output not yet materialized).
        return {
            "task": task,
            "task_input": {"seed": seed},
            "task_output": {"sum": {"__unmaterialized__": "BenchProduceSum.sum"}},
        }

    return Target(FLOOR, base + "/invoke", body)


APPS = {TWO_STAGE_APP: PIPELINE_APP, ONE_STAGE_APP: SINGLE_APP}
"""The benchmark's apps by name: their sources."""


async def set_up_apps(client: CornserveClient, names: list[str]) -> None:
    """Upload the task library, then register the apps `names` (each ready once its tasks are deployed)."""
    lib = await client.add_tasklib(TASKLIB_NAME, (BENCH_DIR / "dispatch_tasklib.py").read_text())
    logger.info("task library %s uploaded: %s", TASKLIB_NAME, lib.unit_tasks)
    for name in names:
        await register_app(client, name, APPS[name])


async def bench_cornserve(url: str, token: str, args: argparse.Namespace) -> list[Result]:
    """Upload the task library, register both apps, measure them and the floor."""
    async with CornserveClient(url, timeout_s=600, token=token) as client:
        await set_up_apps(client, [TWO_STAGE_APP, ONE_STAGE_APP])
        floor = await floor_target(client)

    def app_body(seed: int) -> dict[str, Any]:
        return {"seed": seed}

    auth = {"Authorization": f"Bearer {token}"}
    targets = [
        Target(CORNSERVE, f"{url}/apps/{TWO_STAGE_APP}/invoke", app_body, auth),
        Target(CORNSERVE_ONE, f"{url}/apps/{ONE_STAGE_APP}/invoke", app_body, auth),
        floor,
    ]
    return [await measure(t, args.requests, args.concurrency, args.warmup) for t in targets]


def run_cornserve(args: argparse.Namespace, work_dir: Path) -> list[Result]:
    """Start a local cluster, measure, stop it (always)."""
    cluster = LocalCluster(
        state_dir=work_dir / "cornserve",
        port=free_port(),
        cpu_slots=args.cpu_slots,
        dispatchers=args.dispatchers,
        say=lambda *parts: logger.info("cluster: %s", " ".join(map(str, parts))),
    )
    try:
        cluster.start(ready_timeout_s=300)
        logger.info("gateway at %s", cluster.url)
        return asyncio.run(bench_cornserve(cluster.url, cluster.admin_token, args))
    finally:
        cluster.stop()


# ----- Ray Serve ---------------------------------------------------------------------------------


async def bench_ray(args: argparse.Namespace, work_dir: Path) -> tuple[Result, str]:
    """Run `dispatch_ray.py` as a child, measure it, shut it down (always); returns the result and Ray's version."""
    port = free_port()
    log_path = work_dir / "ray-serve.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])),
    }
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH_DIR / "dispatch_ray.py"),
            "--port",
            str(port),
            "--max-ongoing-requests",
            str(2 * args.concurrency),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        logger.info("starting Ray Serve (log: %s)", log_path)
        try:
            async with asyncio.timeout(300):
                while True:
                    line = (await proc.stdout.readline()).decode()
                    if not line:
                        raise RuntimeError(f"Ray Serve exited while starting; its log:\n{tail(log_path)}")
                    if line.startswith("READY"):
                        break
        except TimeoutError:
            raise RuntimeError(f"Ray Serve was not ready within 300 s; its log:\n{tail(log_path)}") from None
        version = line.split()[2] if len(line.split()) > 2 else "?"
        target = Target(RAY, f"http://127.0.0.1:{port}/", lambda seed: {"seed": seed})
        return await measure(target, args.requests, args.concurrency, args.warmup), version
    finally:
        await stop_ray(proc, log_path)


async def stop_ray(proc: asyncio.subprocess.Process, log_path: Path) -> None:
    """Close its stdin (it runs serve.shutdown() and ray.shutdown()); escalate only past a deadline."""
    logger.info("stopping Ray Serve")
    if proc.stdin is not None:
        proc.stdin.close()
    for sig, wait_s in ((None, 120.0), (signal.SIGTERM, 60.0), (signal.SIGKILL, 30.0)):
        if sig is not None:
            logger.warning("Ray Serve did not stop; sending %s to its process group", sig.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), wait_s)
        except TimeoutError:
            continue
        if proc.returncode != 0:
            logger.warning("Ray Serve exited with %s; its log:\n%s", proc.returncode, tail(log_path))
        return
    raise RuntimeError(f"Ray Serve (pid {proc.pid}) could not be stopped")


def tail(path: Path, lines: int = 30) -> str:
    """The end of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


# ----- report ------------------------------------------------------------------------------------


def print_report(results: list[Result], args: argparse.Namespace, ray_version: str, loads: list[str]) -> None:
    """The comparison table (markdown), the verdict line, and every error."""
    print(
        f"\nHost: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
        f"Ray {ray_version}; load average {' → '.join(loads)}"
    )
    print(
        f"{args.requests} sequential requests (c=1) and {args.requests} at c={args.concurrency} per system, "
        f"after {args.warmup} warm-up requests\n"
    )
    print(f"| system | p50 ms (c=1) | p99 ms (c=1) | req/s (c={args.concurrency}) | errors |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        note = f" ({r.note})" if r.note else ""
        print(
            f"| {r.name}{note} | {r.percentile_ms(0.5):.2f} | {r.percentile_ms(0.99):.2f} | "
            f"{r.throughput_rps:.1f} | {len(r.errors)} |"
        )
    by_name = {r.name: r for r in results}
    cs, ray = by_name.get(CORNSERVE), by_name.get(RAY)
    print()
    if cs is None or ray is None or not cs.latencies_s or not ray.latencies_s:
        print("Cornserve vs Ray Serve: no comparison (one of them did not produce measurements).")
    else:
        p50_win = cs.percentile_ms(0.5) < ray.percentile_ms(0.5)
        rps_win = cs.throughput_rps > ray.throughput_rps
        print(
            f"Cornserve vs Ray Serve: p50 {cs.percentile_ms(0.5):.2f} vs {ray.percentile_ms(0.5):.2f} ms "
            f"→ Cornserve {'lower (beat Ray)' if p50_win else 'NOT lower (did not beat Ray)'}; "
            f"throughput {cs.throughput_rps:.1f} vs {ray.throughput_rps:.1f} req/s "
            f"→ Cornserve {'higher (beat Ray)' if rps_win else 'NOT higher (did not beat Ray)'}."
        )
    for r in results:
        if not r.errors:
            continue
        print(f"\nErrors of {r.name} ({len(r.errors)}), most common first:")
        for message, count in Counter(r.errors).most_common(MAX_PRINTED_ERRORS):
            print(f"  {count}x {message}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per phase (c=1 and c=N) per system"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="requests in flight in the throughput phase"
    )
    parser.add_argument(
        "--warmup", type=int, default=100, help="warm-up requests per system (errors still count)"
    )
    parser.add_argument("--cpu-slots", type=int, default=4, help="Cornserve CPU slots (as `cornserve up`)")
    parser.add_argument(
        "--dispatchers", type=int, default=2, help="Cornserve dispatcher replicas (as `cornserve up`)"
    )
    parser.add_argument("--skip-ray", action="store_true", help="measure Cornserve and the floor only")
    parser.add_argument("--skip-cornserve", action="store_true", help="measure Ray Serve only")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 requests, 5 warm-up")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory with every log")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup = 40, 5
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--requests and --concurrency must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    work_dir = Path(tempfile.mkdtemp(prefix="cornserve-bench-dispatch-"))
    loads = [f"{os.getloadavg()[0]:.2f}"]
    results: list[Result] = []
    ray_version = "skipped"
    failed = False
    try:
        if not args.skip_cornserve:
            results += run_cornserve(args, work_dir)
            loads.append(f"{os.getloadavg()[0]:.2f}")
        if not args.skip_ray:
            ray_result, ray_version = asyncio.run(bench_ray(args, work_dir))
            results.append(ray_result)
            loads.append(f"{os.getloadavg()[0]:.2f}")
    except BaseException:
        failed = True
        logger.error("the benchmark failed; logs are kept in %s", work_dir)
        raise
    finally:
        if results:
            print_report(results, args, ray_version, loads)
        failed = failed or any(r.errors for r in results)
        if args.keep_logs or failed:
            logger.info("logs kept in %s", work_dir)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
