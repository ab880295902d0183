"""Prometheus metrics of every process: one exposition, two ways to reach it.

Each service defines its metrics in a `metrics` module of its own with prometheus-client, in the
process's default registry (one service per process, so no two define the same name). Processes that
serve HTTP answer ``GET /metrics`` on their own port (`exposition` renders the page); processes that
only speak NATS (resource manager, task managers, dispatchers, sidecars) serve the same page on a
separate loopback port when their ``--metrics-port`` is set (`MetricsPort`, prometheus-client's own
threaded server; a collector that reads state the event loop mutates reads it through
`read_on_loop`). With no port set nothing is opened and the only cost is the counters themselves.

Why prometheus-client rather than OpenTelemetry metrics: the issue asks for the Prometheus format,
prometheus-client is the format's reference implementation, and its text parser checks our output.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest, start_http_server

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger(__name__)

METRICS_PORT_ENV = "CORNSERVE_METRICS_PORT"
"""The variable a process's ``--metrics-port`` also reads. Launchers hand ports down as flags and remove
this variable from their children's environment: two processes can never share one port."""

LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
"""Histogram buckets (seconds) for request latency and time to first output: 1 ms to the 300 s deadline."""

STEP_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Histogram buckets (seconds) for the time between two streamed items (a decode step and its relay)."""


SCRAPE_READ_TIMEOUT_S = 5.0
"""How long a scrape waits for the event loop to read a service's state (a blocked loop fails the scrape)."""

T = TypeVar("T")

_metrics_url: ContextVar[str | None] = ContextVar("cornserve_metrics_url", default=None)


def current_metrics_url() -> str | None:
    """Where this process's metrics port serves (None without one): for a service to advertise it."""
    return _metrics_url.get()


def exposition() -> tuple[bytes, str]:
    """The process's metrics in the Prometheus text format, with its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


async def metrics_route(request: web.Request) -> web.Response:
    """An aiohttp handler for ``GET /metrics`` (aiohttp is imported by the services that serve HTTP)."""
    from aiohttp import web

    body, content_type = exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def read_on_loop(source: Callable[[], T], timeout_s: float = SCRAPE_READ_TIMEOUT_S) -> Callable[[], T]:
    """`source` made safe for a collector: it always runs on the event loop running now.

    `MetricsPort` scrapes on prometheus-client's own thread, while the service's state (dicts the
    loop mutates) lives on the loop: reading it from the scrape thread could see a dict change size
    mid-iteration and fail the scrape. The returned reader runs `source` directly when called on the
    loop (an aiohttp ``/metrics`` route) and otherwise hands it to the loop and waits `timeout_s`.
    """
    loop = asyncio.get_running_loop()

    def read() -> T:
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            return source()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not result.set_running_or_notify_cancel():
                return
            try:
                result.set_result(source())
            except Exception as exc:  # handed to the scrape thread, which raises it
                result.set_exception(exc)

        loop.call_soon_threadsafe(run)
        try:
            return result.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            result.cancel()
            raise TimeoutError(f"the event loop did not answer a metrics read within {timeout_s} s") from None

    return read


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` without this process's metrics port: what a launcher hands to the processes it starts."""
    return {k: v for k, v in env.items() if k != METRICS_PORT_ENV}


class MetricsPort:
    """The metrics page on its own port, for a process with no HTTP server (None: nothing opened).

    A context manager: the server thread starts on entry and is shut down on exit. A port that is
    taken is a start-up error (OSError), as a taken service port is.
    """

    def __init__(self, host: str, port: int | None) -> None:
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._token: Token[str | None] | None = None

    @property
    def url(self) -> str | None:
        """Where the page is served (None when no port is set)."""
        if self._server is None:
            return None
        return f"http://{self.host}:{self._server.server_port}/metrics"

    def __enter__(self) -> MetricsPort:
        if self.port is not None:
            self._server, self._thread = start_http_server(self.port, addr=self.host)
            self._token = _metrics_url.set(self.url)
            logger.info("metrics at %s", self.url)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _metrics_url.reset(self._token)
            self._token = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
