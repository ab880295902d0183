"""The one start-up and shutdown skeleton of every Cornserve service and executor process.

`run_service`: parse settings (exit 2 when invalid), configure logging, connect to NATS, start the
service, serve until SIGTERM/SIGINT, drain within a deadline, close NATS. `run_executor` is the same
for executors, whose order matters to the task manager: the HTTP port opens first (so `/health`
answers 503 while the process loads), then the slow initialisation runs.

Exit codes: 0 after a signal (also one that arrives while starting, and also when NATS is gone
during the drain: its NATS work is bounded by `cornserve.runtime.natsstop` and skipped, local
clean-up still runs), 1 when start-up fails or the drain overruns its deadline, 2 on bad settings. Start-up errors of the expected types say what to fix
and are logged without a traceback; anything else is a bug and is logged with one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Protocol, TypeVar

from nats.aio.client import Client

from cornserve.runtime.eventloop import run_on_loop
from cornserve.runtime.logging import configure_logging
from cornserve.runtime.metrics import MetricsPort
from cornserve.runtime.nats import NatsAuthError, NatsConnectTimeout, connect_nats
from cornserve.runtime.natscreds import NatsCredentialsError
from cornserve.runtime.natsstop import current_budget, stopping
from cornserve.runtime.settings import ServiceSettings, parse_settings
from cornserve.runtime.tracing import Tracing, configure_tracing

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)

EXIT_OK = 0
EXIT_FAILED = 1

Serve = Callable[[S, Client], AbstractAsyncContextManager[object]]
"""A service: entering the context starts it (connected to NATS); leaving it drains and stops it."""


class StopRequest:
    """Why the running process stops, and with which exit code.

    SIGTERM/SIGINT or the service itself set the event; a service whose essential part died asks for
    a non-zero code (a signal or an orderly shutdown leaves 0).
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.exit_code = EXIT_OK

    def request(self, exit_code: int = EXIT_OK) -> None:
        """Stop; the first non-zero code asked for is the process's exit code."""
        if exit_code and not self.exit_code:
            self.exit_code = exit_code
        self.event.set()

    async def wait(self) -> None:
        """Until a stop is requested."""
        await self.event.wait()


_stop_request: ContextVar[StopRequest] = ContextVar("cornserve_stop_request")


def stop_callback(exit_code: int = EXIT_OK) -> Callable[[], None]:
    """A function that stops the running service as SIGTERM would, ending the process with `exit_code`.

    For a service told to shut down (0) or one whose essential part died (non-zero, e.g. the vLLM
    proxy when vLLM exits). Call it while starting, inside the service's context; outside the runtime
    it raises LookupError.
    """
    stop = _stop_request.get()
    return lambda: stop.request(exit_code)


class Startable(Protocol):
    """A part with an async start and an async stop (safe to call after a failed start)."""

    async def start(self) -> None:
        """Start serving."""

    async def stop(self) -> None:
        """Drain and close."""


@asynccontextmanager
async def running(part: Startable) -> AsyncIterator[None]:
    """`part` started while the context is open and stopped on the way out (also after a failed start)."""
    try:
        await part.start()
        yield
    finally:
        await part.stop()


class ExecutorProcess(Protocol):
    """What `run_executor` drives."""

    async def start_http(self) -> None:
        """Open the HTTP port (health 503 until initialised)."""

    async def initialize(self) -> None:
        """Load models / libraries / clients; health turns 200 when done."""

    async def stop(self) -> None:
        """Drain and close everything; safe to call in any state."""


def run_service(
    settings_type: type[S],
    serve: Serve[S],
    *,
    argv: Sequence[str] | None = None,
    expected_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run the service `serve` builds from `settings_type`'s settings and a NATS connection; the exit code."""
    settings, tracing = _settings_and_logging(settings_type, argv)
    with _traced(tracing):
        return run_on_loop(
            settings.event_loop,
            serve_until_signal(
                settings,
                _with_nats(serve),
                (*expected_errors, NatsConnectTimeout, NatsAuthError, NatsCredentialsError),
            ),
        )


def run_process(
    settings_type: type[S],
    serve: Callable[[S], AbstractAsyncContextManager[object]],
    *,
    argv: Sequence[str] | None = None,
    expected_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """`run_service` for a process that manages its own NATS connection (the sidecar server)."""
    settings, tracing = _settings_and_logging(settings_type, argv)
    with _traced(tracing):
        return run_on_loop(
            settings.event_loop, serve_until_signal(settings, serve, expected_errors), auto_uvloop=False
        )


def run_executor(
    settings_type: type[S],
    make_server: Callable[[S], ExecutorProcess],
    *,
    argv: Sequence[str] | None = None,
    expected_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run the executor `make_server` builds (port first, then initialisation); returns the exit code."""
    settings, tracing = _settings_and_logging(settings_type, argv)
    with _traced(tracing):
        return run_on_loop(
            settings.event_loop,
            run_executor_until_signal(settings, make_server(settings), expected_errors),
            auto_uvloop=False,
        )


def _settings_and_logging(settings_type: type[S], argv: Sequence[str] | None) -> tuple[S, Tracing]:
    settings = parse_settings(settings_type, argv)
    configure_logging(settings.log_level, settings.log_format, service=settings.service_name)
    return settings, configure_tracing(settings.service_name)


@contextmanager
def _traced(tracing: Tracing) -> Iterator[None]:
    """Flush and stop the process's span export when it ends (nothing when tracing is off)."""
    try:
        yield
    finally:
        tracing.shutdown()


def _with_nats(serve: Serve[S]) -> Callable[[S], AbstractAsyncContextManager[object]]:
    """`serve` with a NATS connection opened before it starts and closed after it stopped."""

    @asynccontextmanager
    async def connected(settings: S) -> AsyncIterator[object]:
        nc = await connect_nats(settings.nats_url, name=settings.nats_client_name, creds=settings.nats_creds)
        try:
            async with serve(settings, nc) as service:
                yield service
        finally:
            await _close_nats(nc, settings.service_name)

    return connected


async def serve_until_signal(
    settings: S,
    serve: Callable[[S], AbstractAsyncContextManager[object]],
    expected_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Start, wait for SIGTERM/SIGINT, stop within the deadline; returns the exit code."""
    name = settings.service_name
    with _StopSignals() as stop, _metrics_port(settings, name) as metrics:
        if metrics is None:
            return EXIT_FAILED
        service = serve(settings)
        entered = await _start(service.__aenter__(), stop, name, expected_errors)
        if isinstance(entered, int):
            return entered
        logger.info("%s serving", name)
        await stop.wait()
        logger.info("%s shutting down (deadline %g s)", name, settings.stop_deadline_s)
        with stopping(name):
            stopped = await _bounded(service.__aexit__(None, None, None), name, settings.stop_deadline_s)
        return stop.exit_code or stopped


async def run_executor_until_signal(
    settings: ServiceSettings, server: ExecutorProcess, expected_errors: tuple[type[BaseException], ...] = ()
) -> int:
    """Open the port, initialise, wait for SIGTERM/SIGINT, stop (bounded); returns the exit code."""
    name = settings.service_name
    with _StopSignals() as stop, _metrics_port(settings, name) as metrics:
        if metrics is None:
            return EXIT_FAILED
        code = EXIT_OK
        try:
            await server.start_http()
        except OSError as exc:
            logger.error("%s cannot open its HTTP port: %s", name, exc)
            code = EXIT_FAILED
        else:
            started = await _start(server.initialize(), stop, name, expected_errors)
            if isinstance(started, int):
                code = started
            else:
                logger.info("%s ready", name)
                await stop.wait()
                logger.info("%s shutting down (deadline %g s)", name, settings.stop_deadline_s)
        with stopping(name):
            stopped = await _bounded(server.stop(), name, settings.stop_deadline_s)
        return code or stop.exit_code or stopped


T = TypeVar("T")


@contextmanager
def _metrics_port(settings: ServiceSettings, name: str) -> Iterator[MetricsPort | None]:
    """The process's metrics port for the block; None (logged) when it cannot be opened."""
    try:
        port = MetricsPort(settings.metrics_host, settings.metrics_port).__enter__()
    except OSError as exc:
        logger.error("%s cannot open its metrics port %s: %s", name, settings.metrics_port, exc)
        yield None
        return
    try:
        yield port
    finally:
        port.__exit__(None, None, None)


async def _start(
    starting: Awaitable[T], stop: StopRequest, name: str, expected_errors: tuple[type[BaseException], ...]
) -> T | int:
    """Await `starting` unless a stop signal comes first; an int result is the exit code to end with."""
    start = asyncio.ensure_future(starting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not start.done():
        logger.info("%s stopped while starting", name)
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        return stop.exit_code
    if (exc := start.exception()) is not None:
        trace = None if isinstance(exc, expected_errors) else exc
        logger.error("%s failed to start: %s: %s", name, type(exc).__name__, exc, exc_info=trace)
        return EXIT_FAILED
    return start.result()


async def _bounded(stopping: Awaitable[object], name: str, deadline_s: float) -> int:
    """Await a drain/stop within `deadline_s`; 1 (logged) when it overruns or fails."""
    try:
        async with asyncio.timeout(deadline_s):
            await stopping
    except TimeoutError:
        logger.error("%s did not stop within %g s; exiting anyway", name, deadline_s)
        return EXIT_FAILED
    except Exception:
        logger.exception("%s failed while stopping", name)
        return EXIT_FAILED
    logger.info("%s stopped", name)
    return EXIT_OK


async def _close_nats(nc: Client, name: str) -> None:
    """Flush what the service published, then close; a dead connection is closed without waiting.

    Part of the stop's NATS budget (`cornserve.runtime.natsstop`): NATS gone costs at most the budget.
    """
    await current_budget(name).close(nc)


class _StopSignals:
    """A `StopRequest` that SIGTERM/SIGINT fulfil while the block runs (handlers removed after it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> StopRequest:
        self.stop = StopRequest()
        self._token = _stop_request.set(self.stop)
        self.loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        return self.stop

    def _on_signal(self, sig: signal.Signals) -> None:
        logger.info("received %s", sig.name)
        self.stop.request()

    def __exit__(self, *exc: object) -> None:
        for sig in self.SIGNALS:
            self.loop.remove_signal_handler(sig)
        _stop_request.reset(self._token)
