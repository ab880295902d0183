"""The gateway's Prometheus metrics: every HTTP request, and per app its invocations.

Per app: invocations by status, latency, time to the first streamed item, time between items, and the
admission gate's running and queued counts.

Names and labels are documented in docs/operations.md ("Metrics"); `GET /metrics` serves them.
Labels are bounded: `route` is the route template (never the raw path), `app` a registered app's name
(an unknown one answers 404 before it is counted per app), `status` the HTTP status code.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import TypeVar

from aiohttp import web
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cornserve.runtime.metrics import LATENCY_BUCKETS_S, STEP_BUCKETS_S, read_on_loop

HTTP_REQUESTS = Counter(
    "cornserve_gateway_http_requests",
    "HTTP requests the gateway answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "cornserve_gateway_http_request_seconds",
    "Time from a request's arrival until its response (a stream: until it ended).",
    ["route", "method"],
    buckets=LATENCY_BUCKETS_S,
)
APP_REQUESTS = Counter(
    "cornserve_app_requests",
    "Invocations of an app, by HTTP status (a stream that failed after it started is counted 200 "
    "and in cornserve_app_stream_errors).",
    ["app", "status"],
)
APP_STREAM_ERRORS = Counter(
    "cornserve_app_stream_errors", "Streams of an app that ended with an error event.", ["app"]
)
APP_SECONDS = Histogram(
    "cornserve_app_request_seconds",
    "End-to-end time of an app invocation, queueing included (a stream: until its last item).",
    ["app"],
    buckets=LATENCY_BUCKETS_S,
)
APP_TTFT = Histogram(
    "cornserve_app_time_to_first_item_seconds",
    "Time from an invocation's arrival to the first item of its stream (TTFT for LLM apps).",
    ["app"],
    buckets=LATENCY_BUCKETS_S,
)
APP_ITEM_GAP = Histogram(
    "cornserve_app_time_per_output_item_seconds",
    "Time between two consecutive items of an app's stream (time per output token for LLM apps).",
    ["app"],
    buckets=STEP_BUCKETS_S,
)

APP_NAME_KEY = "cornserve_app"
"""Where a request that reached an app's admission gate keeps the app's name (`Admission.slot` sets
it, for the app's own invoke route and /v1/chat/completions alike): such requests count per app."""

T = TypeVar("T")


def count_stream_error(app: str) -> None:
    """Count a stream of `app` that ended with an error event (its status was already 200)."""
    APP_STREAM_ERRORS.labels(app=app).inc()


def observe_app(app: str, status: int, seconds: float) -> None:
    """Count one finished invocation of `app`."""
    APP_REQUESTS.labels(app=app, status=str(status)).inc()
    APP_SECONDS.labels(app=app).observe(seconds)


def observe_request(request: web.Request, route: str, status: int, seconds: float) -> None:
    """Count and time one finished request, and the app invocation it was (the observing middleware's hook)."""
    HTTP_REQUESTS.labels(route=route, method=request.method, status=str(status)).inc()
    HTTP_SECONDS.labels(route=route, method=request.method).observe(seconds)
    app = request.get(APP_NAME_KEY)
    if isinstance(app, str):
        observe_app(app, status, seconds)


async def timed_stream(app: str, arrived: float, items: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """`items`, observing the time to the first item and between consecutive items.

    `arrived` is a `time.monotonic` reading (the event loop's clock too); closing this closes `items`.
    """
    previous: float | None = None
    try:
        async for item in items:
            now = time.monotonic()
            if previous is None:
                APP_TTFT.labels(app=app).observe(now - arrived)
            else:
                APP_ITEM_GAP.labels(app=app).observe(now - previous)
            previous = now
            yield item
    finally:
        await items.aclose()


class AdmissionCollector(Collector):
    """Running and queued invocations per app, read from the admission gates at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, dict[str, int]]] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """The families, read now."""
        running = GaugeMetricFamily(
            "cornserve_app_in_flight", "Invocations of an app holding a running slot.", labels=["app"]
        )
        queued = GaugeMetricFamily(
            "cornserve_app_queued",
            "Invocations of an app waiting for a slot (admission queue).",
            labels=["app"],
        )
        for app, counts in (self.source() if self.source is not None else {}).items():
            running.add_metric([app], counts["running"])
            queued.add_metric([app], counts["waiting"])
        return [running, queued]


ADMISSION = AdmissionCollector()
REGISTRY.register(ADMISSION)


def watch_admission(stats: Callable[[], dict[str, dict[str, int]]]) -> None:
    """Report the gates `stats` describes (the gateway's `Admission.stats`) as the per-app gauges."""
    ADMISSION.source = read_on_loop(stats)
