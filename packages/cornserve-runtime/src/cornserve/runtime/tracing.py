"""OpenTelemetry tracing of every process: set-up, span helpers and W3C trace-context propagation.

`configure_tracing` is called once by `run_service` / `run_process` / `run_executor`. It installs an
SDK tracer provider (``service.name`` = the process's name) only when something is to receive the
spans: an OTLP endpoint (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``,
HTTP/protobuf, the SDK's batch processor) or a spans directory (``CORNSERVE_TRACES_DIR``: each
process appends its finished spans as JSON lines to ``<dir>/<service>-<pid>.jsonl``, written when the
span ends; meant for tests and for looking at one request without a collector). With neither set the
SDK and the exporter are not even imported: every span is the API's no-op span, and the only cost is
a context-manager call.

Context crosses processes in the W3C ``traceparent`` header, on HTTP requests and on NATS messages
alike (`inject_headers` / `extract_context`). A process without tracing still passes the context on:
the no-op tracer keeps the remote parent as the current span, so one untraced hop does not split a
trace.

Why the environment rather than a settings field: ``OTEL_*`` are the variables every OpenTelemetry
deployment already sets, and they (and ``CORNSERVE_TRACES_DIR``) are inherited by every child a
process starts, so one setting at ``cornserve up`` traces the whole cluster, task managers and
executors included.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace import SpanKind as SpanKind  # re-exported: callers need not import OpenTelemetry
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

logger = logging.getLogger(__name__)

TRACES_DIR_ENV = "CORNSERVE_TRACES_DIR"
"""A directory every process appends its finished spans to, one JSON-lines file per process."""

OTLP_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
"""The standard variables naming an OTLP receiver (HTTP/protobuf); either turns export on."""

TRACEPARENT = "traceparent"
"""The W3C header carrying trace and parent span ids, on HTTP requests and NATS messages."""

FLUSH_DEADLINE_MS = 5000
"""How long a stopping process waits for its last spans to be exported."""

Attributes = Mapping[str, AttributeValue]

T = TypeVar("T")

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER_NAME = "cornserve"


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for spans to be exported anywhere."""
    env = os.environ if env is None else env
    return bool(env.get(TRACES_DIR_ENV)) or any(env.get(name) for name in OTLP_ENDPOINT_ENVS)


class Tracing:
    """The process's installed tracer provider (or none); `shutdown` flushes and stops it."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider

    @property
    def enabled(self) -> bool:
        """Whether an SDK provider is installed (spans are recorded and exported)."""
        return self.provider is not None

    def shutdown(self) -> None:
        """Export what is still buffered (bounded by `FLUSH_DEADLINE_MS`) and stop the exporters."""
        if self.provider is None:
            return
        if not self.provider.force_flush(FLUSH_DEADLINE_MS):
            logger.warning("some spans were not exported within %d ms", FLUSH_DEADLINE_MS)
        self.provider.shutdown()


def configure_tracing(service: str, env: Mapping[str, str] | None = None) -> Tracing:
    """Install the SDK tracer provider for `service` when the environment asks for it; else nothing.

    Imports the SDK and the OTLP exporter only when they are used. Called once per process; a second
    provider would be refused by the API, so later calls in the same process return a no-op handle.
    """
    env = os.environ if env is None else env
    if not tracing_requested(env):
        return Tracing(None)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return Tracing(None)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    if any(env.get(name) for name in OTLP_ENDPOINT_ENVS):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if traces_dir := env.get(TRACES_DIR_ENV):
        path = Path(traces_dir) / f"{service}-{os.getpid()}.jsonl"
        from cornserve.runtime.spanfile import JsonLinesSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    trace.set_tracer_provider(provider)
    logger.info("tracing on: spans of %s are exported", service)
    return Tracing(provider)


def tracer() -> trace.Tracer:
    """Cornserve's tracer (the API's proxy: no-op until and unless a provider is installed)."""
    return trace.get_tracer(_TRACER_NAME)


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
    parent: otel_context.Context | None = None,
) -> contextlib.AbstractContextManager[Span]:
    """A span named `name` (low-cardinality: a route template, never an id) current for the block.

    `parent` is a context from `extract_context` (a remote caller); by default the current span is
    the parent. An exception leaving the block is recorded on the span and marks it as an error.

    Without a provider and without a trace to continue, the API would make the invalid span and make
    it current, which changes nothing: that case returns it directly, since spans sit on every hop of
    the request path and the API's machinery cost ~10% of a dispatcher's CPU when tracing is off.
    """
    if parent is None and _nothing_to_trace():
        return contextlib.nullcontext(trace.INVALID_SPAN)
    return _current_span(name, kind, attributes, parent)


def _nothing_to_trace() -> bool:
    """No tracer provider is installed and no span is current: every span would be the invalid one."""
    return isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) and not (
        trace.get_current_span().get_span_context().is_valid
    )


@contextlib.contextmanager
def _current_span(
    name: str, kind: SpanKind, attributes: Attributes | None, parent: otel_context.Context | None
) -> Iterator[Span]:
    with tracer().start_as_current_span(name, context=parent, kind=kind, attributes=attributes) as current:
        yield current


def server_span(
    name: str, headers: Mapping[str, str] | None, attributes: Attributes | None = None
) -> contextlib.AbstractContextManager[Span]:
    """A server span for a request that arrived with `headers` (HTTP or NATS), child of its caller."""
    return span(name, kind=SpanKind.SERVER, attributes=attributes, parent=extract_context(headers))


def client_span(name: str, attributes: Attributes | None = None) -> contextlib.AbstractContextManager[Span]:
    """A client span around a call to another process; send `inject_headers()` with the call."""
    return span(name, kind=SpanKind.CLIENT, attributes=attributes)


def set_attributes(attributes: Attributes, current: Span | None = None) -> None:
    """Add `attributes` to `current` (default: the current span); nothing when it does not record."""
    target = current if current is not None else trace.get_current_span()
    if target.is_recording():
        target.set_attributes(attributes)


def mark_error(description: str, current: Span | None = None) -> None:
    """Mark `current` (default: the current span) failed, for a failure answered rather than raised."""
    target = current if current is not None else trace.get_current_span()
    if target.is_recording():
        target.set_status(Status(StatusCode.ERROR, description))


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """`headers` (a new dict by default) with ``traceparent`` of the current span, when there is one."""
    carrier = {} if headers is None else headers
    _PROPAGATOR.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The remote parent named by `headers`' ``traceparent`` (None: none, or one that does not parse).

    Untrusted input: a malformed header is ignored (the span starts a new trace) rather than refused.
    """
    if not headers or not any(key.lower() == TRACEPARENT for key in headers):
        return None
    carrier = {key.lower(): value for key, value in headers.items()}
    ctx = _PROPAGATOR.extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def current_ids() -> tuple[str, str] | None:
    """The current span's (trace id, span id) in hex, or None outside any span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


def carrying_context(coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
    """`coro` made to run under the caller's current span, wherever it is awaited.

    For a coroutine handed to another thread's event loop (``run_coroutine_threadsafe`` starts it in
    that thread's context, which knows nothing of the caller's span).
    """
    ctx = otel_context.get_current()

    async def attached() -> T:
        token = otel_context.attach(ctx)
        try:
            return await coro
        finally:
            otel_context.detach(token)

    return attached()


def start_span(name: str, attributes: Attributes | None = None) -> Span:
    """A child of the current span that is not made current; the caller ends it (``span.end()``).

    For work spread over an async generator's yields, where a current span would be detached in
    whatever context the generator happens to be closed in.
    """
    return tracer().start_span(name, attributes=attributes)


def end_span(current: Span, error: BaseException | None = None, attributes: Attributes | None = None) -> None:
    """End a span from `start_span`, with last `attributes` and `error` recorded when it failed."""
    if current.is_recording():
        if attributes:
            current.set_attributes(attributes)
        if error is not None:
            current.record_exception(error)
            current.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    current.end()
