"""Benchmark: the dispatch path of this checkout's whole cluster against another checkout's.

`bench/dispatch.py` times one version; two runs of it minutes apart differ by 30% and more on a
small shared machine, more than most changes to the gateway, the dispatchers or the sidecar. Here
both clusters run at once (`cornserve up` from each checkout's own `.venv`, as `cluster_ab.py`
starts them), each with the task library `bench/dispatch_tasklib.py` and the apps of
`bench/dispatch.py`; the clusters take turns, `--block` requests each, the order alternating, and
request k of one is paired with request k of the other: both see the same moment's load, and the
per-request difference is the change.

    uv run --group bench python bench/dispatch_ab.py --baseline-checkout ../main --requests 1000

Requests are sequential by default (concurrency 1: the latency path); it prints each cluster's p50
and p99 per app and the paired median of (this - baseline) with a bootstrap 95% interval. With
`--concurrency N` each block sends its requests N at a time instead, and the pairs are blocks, not
requests: per block, each cluster's requests per second and the CPU time its processes
(everything `cornserve up` started, read from /proc) spent per request; the paired medians of
their ratio and difference say whether a change moved throughput or its cost. Every reply's sum
is checked. Run it with this checkout as the baseline too (an A/A) and both ways
(`--baseline-first`) to see how large a difference one run can establish.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from cornserve.client import CornserveClient
from cornserve.runtime.process import free_port

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from cluster_ab import Cluster  # noqa: E402
from dispatch import ONE_STAGE_APP, TWO_STAGE_APP, Target, call_once, run_concurrent, set_up_apps  # noqa: E402
from dispatch_cpu import cpu_seconds, descendants  # noqa: E402
from paired import add_setting_options, bootstrap_median, with_settings  # noqa: E402

APPS = {"two-stage": TWO_STAGE_APP, "one-stage": ONE_STAGE_APP}
"""The `--apps` choices: the app names of `bench/dispatch.py`."""


async def set_up(cluster: Cluster, apps: list[str]) -> None:
    """The task library and the apps on one cluster (`dispatch.set_up_apps`)."""
    async with CornserveClient(cluster.url, timeout_s=600, token=cluster.token) as client:
        await set_up_apps(client, [APPS[app] for app in apps])


def report(app: str, times: dict[str, list[float | None]]) -> None:
    """Each cluster's p50/p99 and the paired median of the differences (ms), errors apart."""
    this, base = times["this"], times["baseline"]
    diffs = [(a - b) * 1e3 for a, b in zip(this, base, strict=True) if a is not None and b is not None]
    own = {label: sorted(t * 1e3 for t in v if t is not None) for label, v in times.items()}
    print(f"\n{app}: {len(diffs)} requests through both clusters (ms)")
    print("| this p50 | baseline p50 | this p99 | baseline p99 | this - baseline, paired median [95% CI] |")
    print("|---:|---:|---:|---:|---:|")
    if not diffs:
        print("| - | - | - | - | no request succeeded in both clusters |")
        return
    p50 = {k: statistics.median(v) for k, v in own.items()}
    p99 = {k: v[min(len(v) - 1, int(len(v) * 0.99))] for k, v in own.items()}
    low, high = bootstrap_median(diffs)
    print(
        f"| {p50['this']:.2f} | {p50['baseline']:.2f} | {p99['this']:.2f} | {p99['baseline']:.2f} | "
        f"{statistics.median(diffs):+.3f} [{low:+.3f}, {high:+.3f}] |"
    )


@dataclass
class Block:
    """One block of concurrent requests through one cluster."""

    requests_per_s: float
    cpu_ms_per_request: float


def report_blocks(app: str, blocks: dict[str, list[Block | None]]) -> None:
    """Each cluster's median throughput and CPU per request, and the paired medians (blocks with errors apart)."""
    pairs = [(a, b) for a, b in zip(blocks["this"], blocks["baseline"], strict=True) if a and b]
    print(f"\n{app}: {len(pairs)} blocks through both clusters")
    print("| | this | baseline | this / baseline (rate) or this - baseline (CPU), paired median [95% CI] |")
    print("|---|---:|---:|---:|")
    if not pairs:
        print("| - | - | - | no block succeeded in both clusters |")
        return
    for name, get, combine, fmt in (
        ("requests/s", lambda b: b.requests_per_s, lambda x, y: x / y, "{:.3f}x"),
        ("CPU ms per request", lambda b: b.cpu_ms_per_request, lambda x, y: x - y, "{:+.3f}"),
    ):
        this = statistics.median(get(a) for a, _ in pairs)
        base = statistics.median(get(b) for _, b in pairs)
        values = [combine(get(a), get(b)) for a, b in pairs]
        low, high = bootstrap_median(values)
        mid = statistics.median(values)
        print(
            f"| {name} | {this:.2f} | {base:.2f} | {fmt.format(mid)} [{fmt.format(low)}, {fmt.format(high)}] |"
        )


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) of `pids` so far."""
    return sum(cpu_seconds(pid) for pid in pids)


async def run(args: argparse.Namespace) -> int:
    if args.concurrency > 1 and (args.gap_s or args.block < args.concurrency):
        raise SystemExit(
            "--concurrency above 1 times whole blocks: it takes no --gap-s, and a --block of at least "
            f"--concurrency ({args.concurrency}; a few hundred gives stable rates)"
        )
    apps = [a for a in args.apps.split(",") if a]
    unknown = set(apps) - set(APPS)
    if unknown:
        raise SystemExit(f"unknown app(s) {sorted(unknown)}; choose from {sorted(APPS)}")
    workdir = Path(tempfile.mkdtemp(prefix="cornserve-bench-dispatch-ab-"))
    clusters = [
        Cluster("this", BENCH_DIR.parent, workdir / "this" / "state", free_port()),
        Cluster(
            "baseline", Path(args.baseline_checkout).resolve(), workdir / "baseline" / "state", free_port()
        ),
    ]
    failures = 0
    try:
        for c in clusters[::-1] if args.baseline_first else clusters:
            c.state_dir.parent.mkdir(parents=True)
            option, settings = (
                ("--this-env", args.this_env) if c.label == "this" else ("--baseline-env", args.baseline_env)
            )
            c.start(args.cpu_slots, with_settings(os.environ, option, settings))
            await c.wait_up(args.start_timeout_s)
            await set_up(c, apps)
            print(
                f"{c.label} ({c.checkout}) is up at {c.url} with {', '.join(apps)}; log {c.log}", flush=True
            )
        targets = {
            (c.label, app): Target(
                app,
                f"{c.url}/apps/{APPS[app]}/invoke",
                lambda seed: {"seed": seed},
                {"Authorization": f"Bearer {c.token}"},
            )
            for c in clusters
            for app in apps
        }
        times: dict[str, dict[str, list[float | None]]] = {
            app: {c.label: [] for c in clusters} for app in apps
        }
        blocks: dict[str, dict[str, list[Block | None]]] = {
            app: {c.label: [] for c in clusters} for app in apps
        }
        rng = random.Random(7)
        connector = aiohttp.TCPConnector(limit=max(100, args.concurrency))
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as http:
            for app in apps:  # warm-up: first requests pay lazy initialisation
                for c in clusters:
                    for seed in range(args.warmup):
                        error = await call_once(http, targets[(c.label, app)], seed)
                        if error is not None:
                            raise SystemExit(f"{c.label}: a warm-up request of {app} failed: {error}")
            print(f"running {args.requests} requests x {len(apps)} app(s) x 2 clusters ...", flush=True)
            # Every process the cluster started, executors included (they exist after the warm-up).
            pids = {c.label: [c.proc.pid, *descendants(c.proc.pid)] for c in clusters if c.proc is not None}
            if args.concurrency > 1:
                print(", ".join(f"{k}: {len(v)} processes" for k, v in pids.items()), flush=True)
            for n, first in enumerate(range(0, args.requests, args.block)):
                for app in apps:
                    order = clusters if (n + apps.index(app)) % 2 == 0 else clusters[::-1]
                    for c in order:
                        seeds = range(first, min(first + args.block, args.requests))
                        if args.concurrency > 1:
                            errors: list[str] = []
                            cpu0, started = tree_cpu_s(pids[c.label]), time.perf_counter()
                            ok = await run_concurrent(
                                http, targets[(c.label, app)], seeds, args.concurrency, errors
                            )
                            elapsed, cpu = time.perf_counter() - started, tree_cpu_s(pids[c.label]) - cpu0
                            failures += len(errors)
                            for error in errors[:3]:
                                print(f"  {c.label} {app} block {n}: {error}", flush=True)
                            blocks[app][c.label].append(
                                None if errors else Block(ok / elapsed, cpu * 1e3 / len(seeds))
                            )
                            continue
                        for k in seeds:
                            started = time.perf_counter()
                            error = await call_once(http, targets[(c.label, app)], k)
                            elapsed = time.perf_counter() - started
                            times[app][c.label].append(None if error else elapsed)
                            if error is not None:
                                failures += 1
                                print(f"  {c.label} {app} request {k}: {error}", flush=True)
                            if args.gap_s:
                                await asyncio.sleep(rng.expovariate(1 / args.gap_s))
    finally:
        for c in clusters:
            c.stop()
    print(f"\nthis: {clusters[0].checkout}  baseline: {clusters[1].checkout}")
    for label, settings in (("this", args.this_env), ("baseline", args.baseline_env)):
        if settings:
            print(f"{label} with {' '.join(settings)}")
    for app in apps:
        if args.concurrency > 1:
            report_blocks(app, blocks[app])
        else:
            report(app, times[app])
    print(f"\nerrors: {failures}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-checkout", required=True, help="another checkout with its own .venv")
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per app, each through both clusters"
    )
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per app and cluster first")
    parser.add_argument("--apps", default="two-stage,one-stage", help="comma-separated: two-stage, one-stage")
    parser.add_argument(
        "--block",
        type=int,
        default=20,
        help="requests of one cluster back to back before the other's (default 20; 1 alternates every "
        "request, which times each one after that cluster idled while the other served)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight within a block (default 1: sequential, paired by request); above 1 "
        "the blocks are paired, by throughput and CPU per request (use a --block of a few hundred)",
    )
    add_setting_options(parser, "`cornserve up`, so in every process of its cluster (repeatable)")
    parser.add_argument(
        "--gap-s", type=float, default=0.0, help="mean pause between requests (default none: back to back)"
    )
    parser.add_argument("--cpu-slots", type=int, default=3, help="per cluster (the apps need 3)")
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--baseline-first",
        action="store_true",
        help="start the baseline's cluster first (run both ways: the start order alone can show as a difference)",
    )
    raise SystemExit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
