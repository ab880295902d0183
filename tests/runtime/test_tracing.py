"""`cornserve.runtime.tracing` in real processes: nothing without a setting, JSON lines, OTLP, NATS headers.

Each case runs `tracing_probe.py` in its own process: a tracer provider is process-wide and installed once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cornserve.runtime.tracing import OTLP_ENDPOINT_ENVS, TRACES_DIR_ENV

PROBE = Path(__file__).with_name("tracing_probe.py")
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACING_ENVS = (*OTLP_ENDPOINT_ENVS, TRACES_DIR_ENV)


def probe(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in TRACING_ENVS}
    done = subprocess.run(
        [sys.executable, str(PROBE), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def read_spans(directory: Path) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_without_a_setting_no_sdk_is_loaded_and_context_still_passes_on() -> None:
    result = probe("off")
    assert result["enabled"] is False
    assert result["loaded"] == []  # neither the SDK nor any exporter was imported
    assert result["provider"] == "ProxyTracerProvider"  # the API's default: every span is a no-op
    assert result["recording"] is False
    assert result["root_headers"] == {}  # no trace of our own to propagate
    # A caller's context goes on unchanged, so an untraced hop does not split the caller's trace.
    assert result["passed_on"] == {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    assert result["ids"] == [CALLER_TRACE, CALLER_SPAN]


def test_spans_directory_gets_one_json_line_per_span_with_parents(tmp_path: Path) -> None:
    result = probe("export", env={TRACES_DIR_ENV: str(tmp_path)})
    assert result["enabled"] is True
    spans = {s["name"]: s for s in read_spans(tmp_path)}
    assert set(spans) == {"probe.server", "probe.inner"}
    server, inner = spans["probe.server"], spans["probe.inner"]
    assert server["trace_id"] == inner["trace_id"] == CALLER_TRACE
    assert server["parent_span_id"] == CALLER_SPAN and server["kind"] == "SERVER"
    assert inner["parent_span_id"] == server["span_id"]
    assert server["service"] == "probe" and server["attributes"] == {"cornserve.bytes": 7}
    assert result["ids"] == [CALLER_TRACE, inner["span_id"]]


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.bodies.append((self.path, self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A tiny OTLP/HTTP receiver on loopback: the endpoint URL and the bodies it received."""
    bodies: list[tuple[str, bytes]] = []
    handler = type("Receiver", (_Receiver,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_otlp_endpoint_receives_the_spans_with_the_service_name(
    otlp_receiver: tuple[str, list[tuple[str, bytes]]],
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    endpoint, bodies = otlp_receiver
    result = probe("export", env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert result["enabled"] is True
    assert [path for path, _ in bodies] == ["/v1/traces"]
    exported = ExportTraceServiceRequest.FromString(bodies[0][1])
    (resource_spans,) = exported.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    assert service == "probe"
    names = {s.name: s for scope in resource_spans.scope_spans for s in scope.spans}
    assert set(names) == {"probe.server", "probe.inner"}
    assert names["probe.server"].trace_id.hex() == CALLER_TRACE
    assert names["probe.inner"].parent_span_id == names["probe.server"].span_id


def test_nats_requests_carry_traceparent_to_the_handler_span(nats_url: str, tmp_path: Path) -> None:
    result = probe("bus", nats_url, env={TRACES_DIR_ENV: str(tmp_path)})
    spans = {s["name"]: s for s in read_spans(tmp_path)}
    assert set(spans) == {"probe.client", "probe.ask"}  # the untraced request started no span
    client, handler = spans["probe.client"], spans["probe.ask"]
    assert handler["kind"] == "SERVER" and handler["parent_span_id"] == client["span_id"]
    assert handler["trace_id"] == client["trace_id"]
    assert result["caller"] == [client["trace_id"], client["span_id"]]
    assert result["handler"] == [handler["trace_id"], handler["span_id"]]
    assert result["untraced"] == []
