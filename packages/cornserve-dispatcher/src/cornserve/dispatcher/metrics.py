"""The dispatcher's Prometheus metrics: graphs and streams in flight, and per unit task its calls.

Per unit task: executor calls (outcome, latency) and, for a streamed output, time to the first item
and between items.

Served on the dispatcher's ``--metrics-port`` (it has no HTTP server); names and labels are listed in
docs/operations.md ("Metrics"). The `task` label is the unit task's class name: bounded by the task
libraries, unlike deployment keys, which change with every config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cornserve.runtime.metrics import LATENCY_BUCKETS_S, STEP_BUCKETS_S, read_on_loop

TASK_CALLS = Counter(
    "cornserve_task_calls",
    "Executor calls of a unit task made by this dispatcher, by outcome (ok or error).",
    ["task", "outcome"],
)
TASK_CALL_SECONDS = Histogram(
    "cornserve_task_call_seconds",
    "Time of one executor call: until its whole output (until the stream opened, for a streamed output).",
    ["task"],
    buckets=LATENCY_BUCKETS_S,
)
TASK_TTFT = Histogram(
    "cornserve_task_time_to_first_item_seconds",
    "Time from sending a streamed call to its first item (TTFT for LLM tasks).",
    ["task"],
    buckets=LATENCY_BUCKETS_S,
)
TASK_ITEM_GAP = Histogram(
    "cornserve_task_time_per_output_item_seconds",
    "Time between two consecutive items of a task's stream (time per output token for LLM tasks).",
    ["task"],
    buckets=STEP_BUCKETS_S,
)
STREAM_ITEMS = Counter("cornserve_task_stream_items", "Stream items relayed, per unit task.", ["task"])
STREAM_MESSAGES = Counter(
    "cornserve_task_stream_messages",
    "Bus messages the relayed items left in, per unit task (fewer than the items: the relay fell "
    "behind and sent the items that piled up together).",
    ["task"],
)


def observe_call(task: str, started: float, ok: bool) -> None:
    """Count one executor call that began at `started` (`time.monotonic`)."""
    TASK_CALLS.labels(task=task, outcome="ok" if ok else "error").inc()
    TASK_CALL_SECONDS.labels(task=task).observe(time.monotonic() - started)


class ItemClock:
    """Times the items of one relayed stream whose call was sent at `started` (`time.monotonic`)."""

    def __init__(self, task: str, started: float) -> None:
        self.task = task
        self.previous: float | None = None
        self.started = started

    def item(self) -> None:
        """One item arrived."""
        now = time.monotonic()
        if self.previous is None:
            TASK_TTFT.labels(task=self.task).observe(now - self.started)
        else:
            TASK_ITEM_GAP.labels(task=self.task).observe(now - self.previous)
        self.previous = now
        STREAM_ITEMS.labels(task=self.task).inc()

    def message(self) -> None:
        """One bus message of items went out."""
        STREAM_MESSAGES.labels(task=self.task).inc()


class LoadCollector(Collector):
    """Graphs and relays in flight and graphs cancelled, read from the running service at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        """The families, read now."""
        load = self.source() if self.source is not None else {"graphs": 0, "relays": 0, "cancelled": 0}
        graphs = GaugeMetricFamily(
            "cornserve_dispatcher_graphs_in_flight", "Graphs this replica is executing."
        )
        graphs.add_metric([], load["graphs"])
        relays = GaugeMetricFamily(
            "cornserve_dispatcher_relays_in_flight", "Streams this replica is relaying."
        )
        relays.add_metric([], load["relays"])
        cancelled = CounterMetricFamily(
            "cornserve_dispatcher_graphs_cancelled", "Graphs (or streams) cancelled by their caller."
        )
        cancelled.add_metric([], load["cancelled"])
        return [graphs, relays, cancelled]


LOAD = LoadCollector()
REGISTRY.register(LOAD)


def watch_load(load: Callable[[], dict[str, int]]) -> None:
    """Report what `load` (the service's micro STATS data) says as the in-flight gauges."""
    LOAD.source = read_on_loop(load)
