"""Benchmark: this checkout's whole cluster against another checkout's, requests alternating.

`bench/mllm.py` compares systems inside one cluster; comparing two versions of the code with it
means two runs minutes apart, and on a small shared machine the same code's end-to-end latency
moves by several milliseconds between such runs, more than most changes to the relays. Here both
clusters run at once (`cornserve up` from each checkout's own `.venv`, the same tiny checkpoint,
the same apps) and each input goes through both, one right after the other, alternating which
goes first: both see the same moment's load, and the per-request difference is the change.

    uv run --group bench python bench/cluster_ab.py --baseline-checkout ../main --requests 200

Prints TTFT, E2E and time per output token for each cluster and the paired medians of
(this - baseline) with a bootstrap 95% interval, per app (fission and monolithic by default).
Each cluster uses `--cpu-slots` CPU slots; the machine runs both at once, so absolute figures are
higher than `bench/mllm.py`'s: read the differences.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from cornserve.client import CornserveClient
from cornserve.runtime.process import free_port
from cornserve.runtime.secrets import read_secret_file
from cornserve.runtime.statedir import admin_token_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mllm import APP_TEMPLATE, PROMPTS, Sample, make_image, one_request
from paired import bootstrap_median
from single_executor import wait_healthy


@dataclass
class Cluster:
    """One `cornserve up` process of a checkout, and what its state dir says once it is up."""

    label: str
    checkout: Path
    state_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    token: str = ""
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.state_dir.parent / f"{self.label}.log"

    def start(self, cpu_slots: int, env: dict[str, str] | None = None) -> None:
        cli = self.checkout / ".venv" / "bin" / "cornserve"
        if not cli.exists():
            raise SystemExit(f"{cli} does not exist: run `uv sync --locked` in {self.checkout} first")
        args = [str(cli), "up", "--state-dir", str(self.state_dir), "--port", str(self.port)]
        args += ["--cpu-slots", str(cpu_slots)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )

    async def wait_up(self, timeout_s: float) -> None:
        """Until the state dir names the gateway and it answers `/health` (the process dying is fatal)."""
        deadline = time.monotonic() + timeout_s
        assert self.proc is not None
        info = self.state_dir / "cluster.json"
        while not (info.exists() and admin_token_path(self.state_dir).exists()):
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.label}: `cornserve up` exited {self.proc.returncode}; see {self.log}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.label}: no cluster.json within {timeout_s:g} s; see {self.log}")
            await asyncio.sleep(0.5)
        self.url = json.loads(info.read_text())["url"]
        self.token = read_secret_file(admin_token_path(self.state_dir))
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, self.url, self.proc)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def ttft(s: Sample) -> float | None:
    return s.ttft


def e2e(s: Sample) -> float | None:
    return s.e2e


def per_token(s: Sample) -> float | None:
    """Seconds per text chunk after the first (None with fewer than two chunks)."""
    if s.first is None or s.last is None or s.chunks < 2:
        return None
    return float(s.last - s.first) / (s.chunks - 1)


FIGURES: list[tuple[str, Callable[[Sample], float | None], str]] = [
    ("TTFT", ttft, ".2f"),
    ("E2E", e2e, ".2f"),
    ("per output token", per_token, ".3f"),
]
"""What `report` prints: a name, the figure of one request (seconds), its format in ms."""


def report(app: str, labels: tuple[str, str], samples: dict[str, list[Sample]]) -> None:
    """One row per figure: each cluster's median, and the paired median of the differences."""
    this, base = labels
    print(f"\n{app}: {len(samples[this])} inputs through both clusters (ms; medians)")
    print(f"| figure | {this} | {base} | {this} - {base}, paired median [95% CI] |")
    print("|---|---:|---:|---:|")
    for name, figure, fmt in FIGURES:
        values = {label: [None if s.error else figure(s) for s in samples[label]] for label in labels}
        diffs = [
            (x - y) * 1000
            for x, y in zip(values[this], values[base], strict=True)
            if x is not None and y is not None
        ]
        own = [[v * 1000 for v in values[label] if v is not None] for label in labels]
        if not diffs or not all(own):
            print(f"| {name} | - | - | no input with this figure in both clusters |")
            continue
        low, high = bootstrap_median(diffs)
        a, b = (statistics.median(v) for v in own)
        print(
            f"| {name} | {a:{fmt}} | {b:{fmt}} | {statistics.median(diffs):+{fmt}} "
            f"[{low:+{fmt}}, {high:+{fmt}}] |"
        )
    for label in labels:
        errors = [s.error for s in samples[label] if s.error is not None]
        if errors:
            print(f"  {label}: {len(errors)} error(s), e.g. {errors[0]}")


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cornserve-bench-cluster-ab-"))
    from cornserve.models.tiny import build_tiny

    model = args.model or str(build_tiny("qwen2-vl", workdir / "tiny-qwen2-vl", seed=0))
    this_checkout = Path(__file__).resolve().parent.parent
    clusters = [
        Cluster("this", this_checkout, workdir / "this" / "state", free_port()),
        Cluster(
            "baseline", Path(args.baseline_checkout).resolve(), workdir / "baseline" / "state", free_port()
        ),
    ]
    for c in clusters:
        c.state_dir.parent.mkdir(parents=True)
    apps = [a for a in args.apps.split(",") if a]
    images = [make_image(i, args.image_size)[0] for i in range(args.requests)]
    bodies = [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "image_url": images[i],
            "max_completion_tokens": args.max_tokens,
        }
        for i in range(args.requests)
    ]
    try:
        starting = clusters[::-1] if args.baseline_first else clusters
        for c in starting:  # one after the other: two model loads at once only slow both
            c.start(args.cpu_slots)
            await c.wait_up(args.start_timeout_s)
            print(f"{c.label} ({c.checkout}) is up at {c.url}; log {c.log}", flush=True)
            async with CornserveClient(c.url, token=c.token) as client:
                for app in apps:
                    source = APP_TEMPLATE.format(model=model, fission=app == "fission")
                    async for _ in client.register_app(app, source):
                        pass
            print(f"  registered {', '.join(apps)}", flush=True)
        samples: dict[str, dict[str, list[Sample]]] = {app: {c.label: [] for c in clusters} for app in apps}
        timeout = aiohttp.ClientTimeout(total=600)
        sessions = {
            c.label: aiohttp.ClientSession(timeout=timeout, headers={"Authorization": f"Bearer {c.token}"})
            for c in clusters
        }
        rng = random.Random(11)
        try:
            for app in apps:  # warm-up: first requests pay lazy initialisation
                for c in clusters:
                    for body in bodies[:3]:
                        warm = Sample(time.monotonic())
                        await one_request(sessions[c.label], f"{c.url}/apps/{app}/invoke", body, warm)
                        if warm.error is not None:
                            raise SystemExit(f"{c.label}: a warm-up request of {app} failed: {warm.error}")
            print(f"running {args.requests} inputs x {len(apps)} app(s) x 2 clusters ...", flush=True)
            for i, body in enumerate(bodies):
                for app in apps:
                    order = clusters if (i + apps.index(app)) % 2 == 0 else clusters[::-1]
                    for c in order:
                        sample = Sample(sent=time.monotonic())
                        await one_request(sessions[c.label], f"{c.url}/apps/{app}/invoke", body, sample)
                        samples[app][c.label].append(sample)
                        await asyncio.sleep(rng.expovariate(1 / args.gap_s))
        finally:
            for s in sessions.values():
                await s.close()
        for app in apps:
            report(app, ("this", "baseline"), samples[app])
    finally:
        for c in clusters:
            c.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-checkout", required=True, help="another checkout with its own .venv")
    parser.add_argument("--model", help="checkpoint dir (default: a tiny random Qwen2-VL, built on the fly)")
    parser.add_argument("--requests", type=int, default=200, help="inputs, each through both clusters")
    parser.add_argument("--apps", default="fission,monolithic", help="comma-separated: fission, monolithic")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--gap-s", type=float, default=0.05, help="mean pause between requests")
    parser.add_argument("--cpu-slots", type=int, default=3)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--baseline-first",
        action="store_true",
        help="start the baseline's cluster first (run both ways: the start order alone can show as a difference)",
    )
    args = parser.parse_args()
    chosen = {a for a in args.apps.split(",") if a}
    unknown = chosen - {"fission", "monolithic"}
    if unknown or not chosen:
        parser.error(f"--apps: unknown app(s) {', '.join(sorted(unknown))}; choose fission, monolithic")
    if args.requests < 10:
        parser.error("--requests must be at least 10 for the intervals to mean anything")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
