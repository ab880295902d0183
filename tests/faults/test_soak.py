"""The soak: a steady load for `CORNSERVE_SOAK_S` seconds (default 30 minutes) with a fault every
tenth of it, while the resident memory and open file descriptors of every process are sampled.

Flat means: for every process that lived through the second half of the soak (a restarted one is
a new process), the median of its last third of samples is within `RSS_SLACK` (+ `RSS_SLACK_BYTES`)
of the median of its samples around the middle, and its descriptors grew by at most `FD_SLACK`.
No request may hang, the load ends recovered, and nothing is left behind (processes, shared memory).

Out of the default run (marker `soak`): `pytest -m soak tests/faults/test_soak.py -s` prints the
per-process figures; `CORNSERVE_SOAK_OUT=<file>` writes them as JSON. docs/reliability.md has them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.faults.support import (
    CONCURRENCY,
    FAULTS,
    HUNG_AFTER_S,
    STEADY_TAIL,
    Matrix,
    Sample,
    collect_pids,
    one_request,
    rss_and_fds,
    service_processes,
    supervised_cluster,
    until_whole,
)
from tests.support.cluster import gateway_session

pytestmark = pytest.mark.soak

SOAK_S = float(os.environ.get("CORNSERVE_SOAK_S", "1800"))
FAULT_EVERY_S = SOAK_S / 10
SAMPLE_EVERY_S = min(30.0, SOAK_S / 30)
SOAK_FAULTS = ["executor", "dispatcher", "gateway", "nats", "sidecar", "task-manager", "resource-manager"]
RSS_SLACK = 0.10
RSS_SLACK_BYTES = 16 * 2**20
FD_SLACK = 8
MAX_SKIPPED_SHARE = 0.2
"""At most this share of sampling rounds may fail to list the processes (the gateway or resource
manager down for a fault); more means the figures rest on too few samples, and the soak fails."""


@dataclass
class Track:
    """Samples of one process: (seconds into the soak, rss bytes, fds)."""

    name: str
    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)


@dataclass
class Sampling:
    """How the sampler fared: rounds tried, and the ones that could not list the processes (and why)."""

    rounds: int = 0
    skipped: list[tuple[float, str]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        reasons = Counter(reason.split(":", 1)[0] for _, reason in self.skipped)
        return {"rounds": self.rounds, "skipped": len(self.skipped), "reasons": dict(reasons)}


@pytest.mark.timeout(SOAK_S + 900)  # the whole soak, plus the cluster's start-up and teardown
def test_soak_with_periodic_faults(tmp_path: Path) -> None:
    # Synchronous: the cluster's start-up and teardown run event loops of their own.
    with supervised_cluster(tmp_path) as state:
        sampling = Sampling()
        tracks, samples, faults = asyncio.run(_soak(state, sampling))
        asyncio.run(collect_pids(state))
    report = _report(tracks, samples, faults, sampling)
    print(report["table"])
    out = os.environ.get("CORNSERVE_SOAK_OUT")
    if out:
        Path(out).write_text(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2))
    outcomes = Counter(s.outcome for s in samples)
    assert outcomes["hung"] == 0 and outcomes["wrong"] == 0 and outcomes["unclean"] == 0, outcomes
    tail = sorted(samples, key=lambda s: s.start)[-STEADY_TAIL:]
    assert all(s.outcome == "ok" for s in tail), Counter(s.detail for s in tail)
    assert not report["growing"], report["table"]
    assert sampling.rounds > 0
    assert len(sampling.skipped) <= MAX_SKIPPED_SHARE * sampling.rounds, (
        sampling.summary(),
        sampling.skipped,
    )


async def _soak(
    state: Matrix, sampling: Sampling
) -> tuple[dict[int, Track], list[Sample], list[tuple[float, str]]]:
    began = time.monotonic()
    samples: list[Sample] = []
    faults: list[tuple[float, str]] = []
    tracks: dict[int, Track] = {}
    seeds = itertools.count(10_000)

    def elapsed() -> float:
        return time.monotonic() - began

    async with gateway_session(state.local, timeout_s=HUNG_AFTER_S + 10) as http:

        async def worker() -> None:
            while elapsed() < SOAK_S:
                start = time.monotonic()
                outcome, detail = await one_request(http, next(seeds))
                samples.append(Sample(start, time.monotonic(), outcome, detail))

        async def sampler() -> None:
            while elapsed() < SOAK_S:
                sampling.rounds += 1
                try:
                    named = await service_processes(state)
                except Exception as exc:  # listing needs the gateway and RM, which faults take down: counted
                    sampling.skipped.append((elapsed(), f"{type(exc).__name__}: {exc}"[:300]))
                    named = {}
                for name, pid in named.items():
                    stats = rss_and_fds(pid)
                    if stats is not None:
                        tracks.setdefault(pid, Track(name, pid)).samples.append((elapsed(), *stats))
                await asyncio.sleep(SAMPLE_EVERY_S)

        async def injector() -> None:
            for fault in itertools.cycle(SOAK_FAULTS):
                await asyncio.sleep(FAULT_EVERY_S)
                if elapsed() > SOAK_S - FAULT_EVERY_S / 2:
                    return  # the last stretch is for recovering
                await until_whole(state)
                await collect_pids(state)
                faults.append((elapsed(), await FAULTS[fault](state)))

        tasks = [asyncio.create_task(worker()) for _ in range(CONCURRENCY // 2)]
        tasks += [asyncio.create_task(sampler()), asyncio.create_task(injector())]
        try:
            async with asyncio.timeout(SOAK_S + HUNG_AFTER_S + 60):
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
    return tracks, samples, faults


def _report(
    tracks: dict[int, Track], samples: list[Sample], faults: list[tuple[float, str]], sampling: Sampling
) -> dict[str, object]:
    rows: list[dict[str, object]] = []
    growing: list[str] = []
    for track in sorted(tracks.values(), key=lambda t: t.name):
        points = track.samples
        if not points or points[0][0] > SOAK_S / 2 or points[-1][0] < SOAK_S * 0.9:
            continue  # did not live through the second half (restarted by a fault): not comparable
        middle = [p for p in points if SOAK_S * 0.4 <= p[0] <= SOAK_S * 0.6]
        last = [p for p in points if p[0] >= SOAK_S * (2 / 3)]
        if not middle or not last:
            continue
        rss_mid = statistics.median(p[1] for p in middle)
        rss_end = statistics.median(p[1] for p in last)
        fds_mid = max(p[2] for p in middle)
        fds_end = max(p[2] for p in last)
        row = {
            "process": track.name,
            "pid": track.pid,
            "rss_mib_start": round(points[0][1] / 2**20, 1),
            "rss_mib_middle": round(rss_mid / 2**20, 1),
            "rss_mib_end": round(rss_end / 2**20, 1),
            "fds_start": points[0][2],
            "fds_middle": fds_mid,
            "fds_end": fds_end,
        }
        rows.append(row)
        if rss_end > rss_mid * (1 + RSS_SLACK) + RSS_SLACK_BYTES or fds_end > fds_mid + FD_SLACK:
            growing.append(track.name)
    outcomes = Counter(s.outcome for s in samples)
    header = f"{'process':<34}{'RSS MiB start/middle/end':>28}{'fds start/middle/end':>24}"
    lines = [header]
    for r in rows:
        rss = "/".join(str(r[k]) for k in ("rss_mib_start", "rss_mib_middle", "rss_mib_end"))
        fds = "/".join(str(r[k]) for k in ("fds_start", "fds_middle", "fds_end"))
        lines.append(f"{r['process']!s:<34}{rss:>28}{fds:>24}")
    table = (
        f"\nsoak: {SOAK_S:.0f} s, {len(samples)} requests {dict(outcomes)}, "
        f"{len(faults)} faults: {[f for _, f in faults]}, sampling rounds {sampling.summary()}\n"
        + "\n".join(lines)
    )
    return {
        "soak_s": SOAK_S,
        "requests": len(samples),
        "outcomes": dict(outcomes),
        "faults": faults,
        "processes": rows,
        "growing": growing,
        "sampling": sampling.summary(),
        "table": table,
    }
