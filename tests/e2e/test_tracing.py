"""One request, one trace: gateway → dispatcher → task managers → Eric and the LLM executor → sidecars.

The whole stack as `cornserve up` runs it, with ``CORNSERVE_TRACES_DIR`` set as an operator would set
an OTLP endpoint: every process inherits it (task managers and executors too) and writes its finished
spans to its own JSON-lines file there. One invocation of an MLLM app with encoder fission must give
one connected trace: every span shares the trace id, exactly one is the root (the gateway's HTTP span),
every other span's parent is in the set, and at least five processes contributed.

Behind `slow`: it starts its own cluster (the setting must be in place before the processes start).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.apps import MLLM_APP
from tests.e2e.media import MAX_TOKENS, data_url, messages, picture
from tests.support.cluster import gateway_session, running_local_cluster
from tests.support.plugin import TinyCheckpoint

from cornserve.cli.launcher import LocalCluster
from cornserve.runtime.tracing import TRACES_DIR_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REQUEST_ID = "trace-probe-1"
SPANS_DEADLINE_S = 60.0


def read_spans(directory: Path) -> list[dict[str, Any]]:
    """Every span every process has written so far (a line still being written is skipped)."""
    spans = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                spans.append(json.loads(line))
            except ValueError:
                continue
    return spans


def trace_of(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spans of the trace whose gateway span served `REQUEST_ID` (none yet: empty)."""
    roots = [
        s
        for s in spans
        if s["attributes"].get("cornserve.request_id") == REQUEST_ID and s["kind"] == "SERVER"
    ]
    roots = [s for s in roots if s["name"].startswith("POST /apps/")]
    if not roots:
        return []
    trace_id = roots[0]["trace_id"]
    return [s for s in spans if s["trace_id"] == trace_id]


async def wait_for_trace(directory: Path, names: set[str]) -> list[dict[str, Any]]:
    """The request's trace once spans named `names` are all in it (spans are written when they end)."""
    deadline = asyncio.get_running_loop().time() + SPANS_DEADLINE_S
    while True:
        spans = trace_of(read_spans(directory))
        if names <= {s["name"] for s in spans}:
            return spans
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"spans {sorted(names - {s['name'] for s in spans})} missing from {spans}")
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def traced_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalCluster, Path]]:
    """A local cluster whose every process writes its spans to the returned directory."""
    traces = tmp_path_factory.mktemp("traces")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TRACES_DIR_ENV, str(traces))
        with running_local_cluster(tmp_path_factory.mktemp("traced-cluster"), cpu_slots=2) as local:
            yield local, traces


async def test_one_invocation_is_one_connected_trace_across_processes(
    traced_cluster: tuple[LocalCluster, Path], tiny_checkpoint: TinyCheckpoint
) -> None:
    local, traces = traced_cluster
    qwen = tiny_checkpoint("qwen2-vl", seed=0)
    async with gateway_session(local, timeout_s=600) as gateway:
        source = MLLM_APP.format(model=str(qwen), fission=True)
        async with gateway.post("/apps", json={"name": "traced", "source": source}) as response:
            assert response.status == 201, await response.text()
        body = {
            "messages": messages(data_url(picture(1)), "What is this?"),
            "max_completion_tokens": MAX_TOKENS,
        }
        headers = {"X-Request-Id": REQUEST_ID}
        async with gateway.post("/apps/traced/invoke", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            lines = [line async for line in response.content if line.strip()]
        assert lines and all("error" not in json.loads(line) for line in lines)
        expected = {
            "POST /apps/{name}/invoke",  # gateway: the HTTP server span, the root
            "graph.submit",  # gateway: the app driver's graph submission
            "graph.execute",  # dispatcher
            "task.route",  # dispatcher: an executor from the task manager's table (no tm.route then)
            "task.call",  # dispatcher → executor
            "POST /embeddings",  # Eric
            "POST /v1/chat/completions",  # LLM executor
            "llm.sequence",  # LLM executor: the sequence, with its token count
            "sidecar.send",  # Eric's sidecar client, and its server's handler
            "sidecar.recv",  # the LLM executor's sidecar client, and its server's handler
            "sidecar.transfer",  # the source sidecar server's delivery to the destination rank
            "sidecar.deliver",  # the destination sidecar server taking the delivery
        }
        spans = await wait_for_trace(traces, expected)
        async with gateway.delete("/apps/traced") as response:
            assert response.status == 200, await response.text()

    by_id = {s["span_id"]: s for s in spans}
    assert len(by_id) == len(spans), "span ids are unique"
    roots = [s for s in spans if s["parent_span_id"] is None]
    assert [r["name"] for r in roots] == ["POST /apps/{name}/invoke"], roots
    assert roots[0]["attributes"]["cornserve.app"] == "traced"
    orphans = [s for s in spans if s["parent_span_id"] is not None and s["parent_span_id"] not in by_id]
    assert not orphans, orphans
    services = {s["service"] for s in spans}
    # The task managers are off the request path while their executor tables are fresh (a `route`
    # request, and its tm.route span, only without one).
    assert services >= {"gateway", "dispatcher", "eric", "llm-executor", "sidecar"}, services
    # Processes, not just names: two sidecar servers (Eric's rank and the LLM's) among them.
    processes = {(s["service"], s["pid"]) for s in spans}
    assert len(processes) >= 6, sorted(processes)
    print(f"one trace: {len(spans)} spans from {len(processes)} processes: {sorted(processes)}")
    sequence = next(s for s in spans if s["name"] == "llm.sequence")
    assert sequence["attributes"]["gen_ai.usage.output_tokens"] >= 1
    errors = [(s["service"], s["name"]) for s in spans if s["status"] == "ERROR"]
    assert not errors, f"a successful request's spans say ERROR: {errors}"
    routes = [s for s in spans if s["name"] == "task.route"]
    assert {s["attributes"]["cornserve.task_class"] for s in routes} >= {"EncoderTask"}
    assert all(s["attributes"].get("cornserve.executor_id") for s in routes)
    sources = {s["attributes"]["cornserve.route_source"] for s in routes}
    assert sources <= {"table", "task_manager"}, sources
    transfers = [s for s in spans if s["name"] == "sidecar.transfer"]
    assert transfers and all(s["attributes"]["cornserve.bytes"] > 0 for s in transfers)
