"""Tracing as a real process sees it (one tracer provider per process), for tests/runtime/test_tracing.py.

`python tests/runtime/tracing_probe.py off|export|bus [NATS_URL]` prints one JSON object on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys

from cornserve.runtime.tracing import (
    TRACEPARENT,
    configure_tracing,
    current_ids,
    inject_headers,
    server_span,
    span,
)

CALLER = {TRACEPARENT: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
"""A caller's trace context, as the W3C specification's example writes it."""


def off() -> dict[str, object]:
    """What a process without any tracing setting has: no SDK, no exporter, context still passed on."""
    handle = configure_tracing("probe")
    with span("probe.root") as root:
        root_headers = inject_headers()
    with server_span("probe.server", CALLER) as served:
        passed_on = inject_headers()
        ids = current_ids()
    from opentelemetry import trace

    loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))
    return {
        "enabled": handle.enabled,
        "loaded": loaded,
        "provider": type(trace.get_tracer_provider()).__name__,
        "recording": root.is_recording() or served.is_recording(),
        "root_headers": root_headers,
        "passed_on": passed_on,
        "ids": ids,
    }


def export() -> dict[str, object]:
    """Spans exported by whatever the environment configured, flushed at shutdown."""
    handle = configure_tracing("probe")
    with server_span("probe.server", CALLER, {"cornserve.bytes": 7}), span("probe.inner"):
        ids = current_ids()
    handle.shutdown()
    return {"enabled": handle.enabled, "ids": ids}


async def bus(nats_url: str) -> dict[str, object]:
    """A traced request over real NATS through `cornserve.bus.micro`: the handler's span is its child."""
    from nats.micro import add_service
    from pydantic import BaseModel

    from cornserve.bus.micro import HandlerRunner, request
    from cornserve.runtime.nats import connect_nats

    class Ask(BaseModel):
        request_id: str = "probe-1"

    class Answer(BaseModel):
        ids: list[str]

    async def handle(_: Ask) -> Answer:
        ids = current_ids()
        return Answer(ids=list(ids) if ids else [])

    handle_tracing = configure_tracing("probe")
    nc = await connect_nats(nats_url, name="tracing-probe")
    runner = HandlerRunner()
    svc = await add_service(nc, name="tracing-probe", version="0.0.1")
    await svc.add_endpoint(
        name="ask", subject="tracing.probe.ask", handler=runner.wrap(Ask, handle, "probe.ask")
    )
    try:
        with span("probe.client"):
            caller = current_ids()
            answer = await request(nc, "tracing.probe.ask", Ask(), Answer, timeout=10)
        untraced = await request(nc, "tracing.probe.ask", Ask(), Answer, timeout=10)
    finally:
        await svc.stop()
        await runner.close()
        await nc.close()
    handle_tracing.shutdown()
    return {"caller": caller, "handler": answer.ids, "untraced": untraced.ids}


if __name__ == "__main__":
    mode = sys.argv[1]
    result = off() if mode == "off" else export() if mode == "export" else asyncio.run(bus(sys.argv[2]))
    print(json.dumps(result))
