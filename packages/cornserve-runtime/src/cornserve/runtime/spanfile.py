"""The spans-directory exporter (``CORNSERVE_TRACES_DIR``): finished spans as JSON lines in a file.

For tests and for a quick look at one request without a collector; production export is OTLP.
Imported only when the setting is on (it needs the SDK, which a process without tracing never loads).
Each process writes its own file, so lines of different processes never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

logger = logging.getLogger(__name__)


def _json_span(span: ReadableSpan) -> dict[str, object]:
    """One finished span as a flat JSON object (ids in hex, as every trace viewer shows them)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "trace_id": trace.format_trace_id(ctx.trace_id) if ctx else None,
        "span_id": trace.format_span_id(ctx.span_id) if ctx else None,
        "parent_span_id": trace.format_span_id(parent.span_id) if parent else None,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


class JsonLinesSpanExporter(SpanExporter):
    """A span exporter appending each finished span to a file as one JSON line (tests, quick looks)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append `spans`; a full disk is reported as a failed export (the SDK logs it)."""
        lines = "".join(json.dumps(_json_span(s), default=str) + "\n" for s in spans)
        try:
            with self._lock, self.path.open("a", encoding="utf-8") as out:
                out.write(lines)
        except OSError:
            logger.exception("cannot write spans to %s", self.path)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing is held open between exports."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Every export is written when it happens."""
        return True
