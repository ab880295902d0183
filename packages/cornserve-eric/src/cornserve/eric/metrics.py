"""Eric's Prometheus metrics (`GET /metrics`): its pending media items and how batching went.

Read from the batcher at scrape time (the same figures `/info` shows under `batching`), on the
event loop that owns it (`cornserve.runtime.metrics.read_on_loop`, as every collector of loop state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cornserve.eric.batcher import BatchStats, DynamicBatcher
from cornserve.runtime.metrics import read_on_loop


class BatcherCollector(Collector):
    """The watched batcher, read now."""

    def __init__(self) -> None:
        self.source: Callable[[], tuple[int, BatchStats]] | None = None
        """The pending items and a copy of the counters, read on the batcher's loop."""

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        """The families, read now (none before the encoder is loaded)."""
        if self.source is None:
            return []
        pending_items, stats = self.source()
        pending = GaugeMetricFamily(
            "cornserve_eric_pending_items",
            "Media items admitted and not yet answered (fetch, queue, encode, send).",
        )
        pending.add_metric([], pending_items)
        families: list[GaugeMetricFamily | CounterMetricFamily] = [pending]
        for name, doc, value in (
            ("cornserve_eric_batches", "Encoder forwards (batches) run.", stats.batches),
            ("cornserve_eric_items", "Media items encoded.", stats.items),
            (
                "cornserve_eric_dropped_items",
                "Queued items dropped because their caller hung up.",
                stats.dropped,
            ),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            families.append(counter)
        return families


BATCHER = BatcherCollector()
REGISTRY.register(BATCHER)


def watch_batcher(batcher: DynamicBatcher) -> None:
    """Report `batcher` (called on its event loop, which then serves every read)."""
    BATCHER.source = read_on_loop(lambda: (batcher.pending, batcher.stats.model_copy(deep=True)))
