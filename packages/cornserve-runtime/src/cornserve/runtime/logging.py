"""The one place a process's log output is set up: text or JSON lines, each with service and request id.

`configure_logging` is called once by `run_service` / `run_executor`; request handlers wrap their work
in `request_context(request_id)` so every line logged while serving it (by any module, in any task
spawned from it) carries the id, and one request can be followed across services. Lines logged while
an OpenTelemetry span is current (`cornserve.runtime.tracing`) also carry its trace and span ids:
JSON lines as ``trace_id`` / ``span_id``, text lines as ``t=<first 8 hex digits of the trace id>``
after the request id, enough to find the trace in a viewer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

from cornserve.runtime.settings import LogFormat, LogLevel
from cornserve.runtime.tracing import current_ids

request_id_var: ContextVar[str | None] = ContextVar("cornserve_request_id", default=None)
"""The id of the request being handled in this context (None outside any request)."""

NO_REQUEST = "-"
"""What text lines show in place of a request id outside any request."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(service)s %(name)s [%(request_id)s%(trace_short)s]: %(message)s"

TRACE_SHORT_DIGITS = 8
"""How many hex digits of the trace id text lines show (JSON lines carry all 32)."""


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Tag every log line inside the block (and tasks created in it) with `request_id`."""
    token = request_id_var.set(request_id or None)
    try:
        yield
    finally:
        request_id_var.reset(token)


def set_request_id(request_id: str | None) -> None:
    """Tag the rest of the current task's log lines with `request_id` (for a task that is one request)."""
    request_id_var.set(request_id or None)


class _ContextFilter(logging.Filter):
    """Adds `service`, `request_id` and the current span's ids to every record the handler emits."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.request_id = request_id_var.get() or NO_REQUEST
        ids = current_ids()
        record.trace_id, record.span_id = ids if ids is not None else (None, None)
        record.trace_short = f" t={ids[0][:TRACE_SHORT_DIGITS]}" if ids is not None else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, service, logger, request_id, message (+ exc).

    While a span is current the line also has its ``trace_id`` and ``span_id``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (no newlines inside: tracebacks are escaped)."""
        request_id = getattr(record, "request_id", NO_REQUEST)
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": getattr(record, "service", None),
            "logger": record.name,
            "request_id": None if request_id == NO_REQUEST else request_id,
            "message": record.getMessage(),
        }
        if (trace_id := getattr(record, "trace_id", None)) is not None:
            line["trace_id"] = trace_id
            line["span_id"] = getattr(record, "span_id", None)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: LogLevel | str, fmt: LogFormat, *, service: str) -> None:
    """Send every logger's records to stderr as `fmt` lines at `level`, replacing any earlier set-up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(service))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
