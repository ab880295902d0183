"""Benchmark: the dispatch path of this checkout's whole cluster against another checkout's.

`bench/dispatch.py` times one version; two runs of it minutes apart differ by 30% and more on a
small shared machine, more than most changes to the gateway, the dispatchers or the sidecar. Here
both clusters run at once (`cornserve up` from each checkout's own `.venv`, as `cluster_ab.py`
starts them), each with the task library `bench/dispatch_tasklib.py` and the apps of
`bench/dispatch.py`; the clusters take turns, `--block` requests each, the order alternating, and
request k of one is paired with request k of the other: both see the same moment's load, and the
per-request difference is the change.

    uv run --group bench python bench/dispatch_ab.py --baseline-checkout ../main --requests 1000

Requests are sequential (concurrency 1: the latency path; `bench/dispatch.py` measures throughput).
Every reply's sum is checked. Prints each cluster's p50 and p99 per app and the paired median of
(this - baseline) with a bootstrap 95% interval. Run it with this checkout as the baseline too (an
A/A) and both ways (`--baseline-first`) to see how large a difference one run can establish.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from cornserve.client import CornserveClient
from cornserve.runtime.process import free_port

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from cluster_ab import Cluster  # noqa: E402
from dispatch import ONE_STAGE_APP, TWO_STAGE_APP, Target, call_once, set_up_apps  # noqa: E402
from paired import bootstrap_median  # noqa: E402

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


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="cornserve-bench-dispatch-ab-"))
    clusters = [
        Cluster("this", BENCH_DIR.parent, workdir / "this" / "state", free_port()),
        Cluster(
            "baseline", Path(args.baseline_checkout).resolve(), workdir / "baseline" / "state", free_port()
        ),
    ]
    apps = [a for a in args.apps.split(",") if a]
    unknown = set(apps) - set(APPS)
    if unknown:
        raise SystemExit(f"unknown app(s) {sorted(unknown)}; choose from {sorted(APPS)}")
    failures = 0
    try:
        for c in clusters[::-1] if args.baseline_first else clusters:
            c.state_dir.parent.mkdir(parents=True)
            c.start(args.cpu_slots)
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
        rng = random.Random(7)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            for app in apps:  # warm-up: first requests pay lazy initialisation
                for c in clusters:
                    for seed in range(args.warmup):
                        error = await call_once(http, targets[(c.label, app)], seed)
                        if error is not None:
                            raise SystemExit(f"{c.label}: a warm-up request of {app} failed: {error}")
            print(f"running {args.requests} requests x {len(apps)} app(s) x 2 clusters ...", flush=True)
            for n, first in enumerate(range(0, args.requests, args.block)):
                for app in apps:
                    order = clusters if (n + apps.index(app)) % 2 == 0 else clusters[::-1]
                    for c in order:
                        for k in range(first, min(first + args.block, args.requests)):
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
    for app in apps:
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
