"""The sidecar server's Prometheus metrics: its arena, and the chunks it delivers, per path.

Served on the server's ``--metrics-port``. `path` says how a chunk reached one destination: `shm`
(same node, the bytes stay in this arena), `cuda_ipc` (same node, a GPU handle), `tcp` (across nodes,
the bytes streamed into the peer's arena) or `nccl` (across nodes, announced for a GPU pull).
Arena figures are read from the server at scrape time, on its event loop (`read_on_loop`: the scrape
thread never iterates the server's dicts): they are one scrape's snapshot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cornserve.bus.sidecar import StatsReply
from cornserve.runtime.metrics import STEP_BUCKETS_S

DELIVERIES = Counter(
    "cornserve_sidecar_deliveries",
    "Chunks this rank delivered (or failed to deliver) to one destination rank, by path and outcome.",
    ["rank", "path", "outcome"],
)
DELIVERED_BYTES = Counter(
    "cornserve_sidecar_delivered_bytes",
    "Bytes of chunks delivered to destination ranks, by path.",
    ["rank", "path"],
)
DELIVERY_SECONDS = Histogram(
    "cornserve_sidecar_delivery_seconds",
    "Time to deliver one chunk to one destination (TCP: the whole byte stream).",
    ["rank", "path"],
    buckets=(*STEP_BUCKETS_S, 5.0, 10.0, 30.0),
)


@functools.cache
def _delivery_series(rank: int, path: str) -> tuple[Counter, Counter, Counter, Histogram]:
    """The labelled series of one (rank, path): looked up once, not on every delivery.

    A few ranks and four paths make a handful of entries; `labels()` costs microseconds a call on the
    transfer's path.
    """
    labels = {"rank": str(rank), "path": path}
    return (
        DELIVERIES.labels(**labels, outcome="ok"),
        DELIVERIES.labels(**labels, outcome="error"),
        DELIVERED_BYTES.labels(**labels),
        DELIVERY_SECONDS.labels(**labels),
    )


def observe_delivery(rank: int, path: str, nbytes: int, seconds: float, ok: bool) -> None:
    """Count one delivery of `nbytes` to one destination."""
    delivered, failed, delivered_bytes, delivery_seconds = _delivery_series(rank, path)
    if ok:
        delivered.inc()
        delivered_bytes.inc(nbytes)
        delivery_seconds.observe(seconds)
    else:
        failed.inc()


class ArenaCollector(Collector):
    """The arena's usage and the server's bookkeeping, from its STATS reply, read now."""

    def __init__(self) -> None:
        self.source: Callable[[], StatsReply] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        """The families, read now (none before the server started)."""
        if self.source is None:
            return []
        stats = self.source()
        rank = [str(stats.rank)]
        families: list[GaugeMetricFamily | CounterMetricFamily] = []
        for name, doc, value in (
            ("cornserve_sidecar_arena_bytes", "Size of this rank's shared-memory arena.", stats.arena_bytes),
            ("cornserve_sidecar_arena_used_bytes", "Arena bytes allocated now (spare reservations apart).", stats.used_bytes),
            ("cornserve_sidecar_arena_spare_bytes", "Arena bytes clients reserved ahead for their next send.", stats.spare_bytes),
            ("cornserve_sidecar_arena_allocations", "Allocations in the arena now.", stats.allocations),
            ("cornserve_sidecar_held_chunks", "Chunks held for destinations that have not released them.", stats.held_entries),
            ("cornserve_sidecar_mailbox_chunks", "Chunks delivered here and not yet received.", stats.mailbox_entries),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(name, doc, labels=["rank"])
            gauge.add_metric(rank, value)
            families.append(gauge)
        for name, doc, value in (
            ("cornserve_sidecar_expired_chunks", "Chunks reclaimed after their TTL.", stats.expired_total),
            ("cornserve_sidecar_lost_chunks", "Chunks lost to a peer's restart.", stats.lost_total),
        ):
            counter = CounterMetricFamily(name, doc, labels=["rank"])
            counter.add_metric(rank, value)
            families.append(counter)
        return families


ARENA = ArenaCollector()
REGISTRY.register(ARENA)


def watch_arena(stats: Callable[[], StatsReply]) -> None:
    """Report what `stats` (the server's STATS reply) says."""
    ARENA.source = stats
