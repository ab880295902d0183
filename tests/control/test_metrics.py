"""Prometheus metrics on the shared cluster, read as Prometheus reads them.

Every page (the gateway's /metrics, the metrics ports of dispatchers, sidecars and the resource
manager that `cornserve up` records in cluster.json, a task manager's page from GET /tasks) must
parse with prometheus-client's own parser, and the counters must move by exactly the requests sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.control.apps import PIPELINE_APP, ROWS_APP
from tests.control.support import admin_nats, call, ensure_tasklib
from tests.support.cluster import gateway_session
from tests.support.waiting import wait_for

from cornserve.bus.control import DISPATCHER_SERVICE_NAME, RM_SERVICE_NAME, TM_SERVICE_NAME
from cornserve.bus.subjects import SIDECAR_SERVICE_NAME
from cornserve.cli.launcher import STATE_FILE, LocalCluster

pytestmark = pytest.mark.slow  # a whole `cornserve up` cluster for the module

PIPE, ROWS = "metrics-pipe", "metrics-rows"
SENT = 5
"""Invocations per app between the two scrapes."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str, token: str | None = None) -> Samples:
    """One page, parsed: (sample name, labels) -> value."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def apps(cluster: LocalCluster) -> Iterator[None]:
    """The pipeline app (forwards through the sidecars) and the streaming rows app, registered."""

    async def register() -> None:
        async with gateway_session(cluster, timeout_s=300) as http:
            await ensure_tasklib(http)
            for name, source in ((PIPE, PIPELINE_APP), (ROWS, ROWS_APP)):
                status, body = await call(http, "POST", "/apps", {"name": name, "source": source})
                assert status == 201, body

    async def unregister() -> None:
        async with gateway_session(cluster, timeout_s=300) as http:
            for name in (PIPE, ROWS):
                await call(http, "DELETE", f"/apps/{name}")

    asyncio.run(register())
    yield
    asyncio.run(unregister())


def metrics_urls(cluster: LocalCluster) -> dict[str, str]:
    """What `cornserve up` recorded in cluster.json."""
    urls = json.loads((cluster.state_dir / STATE_FILE).read_text())["metrics"]
    assert isinstance(urls, dict)
    return urls


async def scrape_all(cluster: LocalCluster) -> dict[str, Samples]:
    urls = metrics_urls(cluster)
    pages = await asyncio.gather(*(scrape(u) for u in urls.values()))
    return dict(zip(urls, pages, strict=True))


async def test_every_page_parses_and_counters_move_by_the_requests_sent(
    cluster: LocalCluster, apps: None, http: aiohttp.ClientSession
) -> None:
    urls = metrics_urls(cluster)
    assert set(urls) >= {"gateway", "resource-manager", "dispatcher-0", "dispatcher-1", "sidecar-0"}
    before = await scrape_all(cluster)

    for seed in range(SENT):
        status, body = await call(http, "POST", f"/apps/{PIPE}/invoke", {"seed": seed, "n": 4})
        assert status == 200, body
        async with http.post(f"/apps/{ROWS}/invoke", json={"seed": seed, "n": 3}) as resp:
            assert resp.status == 200
            lines = [json.loads(x) for x in (await resp.text()).splitlines() if x.strip()]
            assert [x["index"] for x in lines] == [0, 1, 2]
    status, _ = await call(http, "POST", f"/apps/{PIPE}/invoke", {"seed": "not a number"})
    assert status == 422

    after = await scrape_all(cluster)
    gw0, gw1 = before["gateway"], after["gateway"]
    requests = "cornserve_app_requests_total"
    assert value(gw1, requests, app=PIPE, status="200") - value(gw0, requests, app=PIPE, status="200") == SENT
    assert value(gw1, requests, app=PIPE, status="422") - value(gw0, requests, app=PIPE, status="422") == 1
    assert value(gw1, requests, app=ROWS, status="200") - value(gw0, requests, app=ROWS, status="200") == SENT
    http_requests = "cornserve_gateway_http_requests_total"
    invoke = {"route": "/apps/{name}/invoke", "method": "POST"}
    assert value(gw1, http_requests, **invoke) - value(gw0, http_requests, **invoke) == 2 * SENT + 1
    count = "cornserve_app_request_seconds_count"
    assert value(gw1, count, app=PIPE) - value(gw0, count, app=PIPE) == SENT + 1
    ttft = "cornserve_app_time_to_first_item_seconds_count"
    assert value(gw1, ttft, app=ROWS) - value(gw0, ttft, app=ROWS) == SENT
    gaps = "cornserve_app_time_per_output_item_seconds_count"
    assert value(gw1, gaps, app=ROWS) - value(gw0, gaps, app=ROWS) == 2 * SENT  # 3 items: 2 gaps each
    assert value(gw1, "cornserve_app_in_flight", app=PIPE) == 0
    assert value(gw1, "cornserve_app_queued", app=PIPE) == 0

    # Dispatchers: one call per unit-task invocation (the pipeline makes 4, the rows app 2).
    dispatchers = [name for name in urls if name.startswith("dispatcher-")]

    def calls(pages: dict[str, Samples], task: str) -> float:
        return sum(
            value(pages[d], "cornserve_task_calls_total", task=task, outcome="ok") for d in dispatchers
        )

    assert calls(after, "MakeMatrix") - calls(before, "MakeMatrix") == 3 * SENT
    assert calls(after, "MatMul") - calls(before, "MatMul") == SENT
    assert calls(after, "Reduce") - calls(before, "Reduce") == SENT
    items = sum(
        value(after[d], "cornserve_task_stream_items_total")
        - value(before[d], "cornserve_task_stream_items_total")
        for d in dispatchers
    )
    assert items == 3 * SENT
    assert all(value(after[d], "cornserve_dispatcher_graphs_in_flight") == 0 for d in dispatchers)

    # Sidecars: their arenas, and the forwards they delivered (the pipeline forwards A, B and A @ B).
    sidecars = [name for name in urls if name.startswith("sidecar-")]
    assert all(value(after[s], "cornserve_sidecar_arena_bytes") > 0 for s in sidecars)
    delivered = sum(
        value(after[s], "cornserve_sidecar_deliveries_total", outcome="ok")
        - value(before[s], "cornserve_sidecar_deliveries_total", outcome="ok")
        for s in sidecars
    )
    assert delivered >= 3 * SENT


async def test_task_managers_report_their_metrics_page(
    cluster: LocalCluster, apps: None, http: aiohttp.ClientSession
) -> None:
    status, body = await call(http, "GET", "/tasks")
    assert status == 200, body
    ours: list[dict[str, Any]] = [t for t in body["tasks"] if any(PIPE in u for u in t["users"])]
    assert ours
    for task in ours:
        assert task["metrics_url"], task
        page = await scrape(task["metrics_url"])
        labels = {"deployment": task["key"], "task": task["task"]}
        assert value(page, "cornserve_task_executors", **labels, state="ready") == len(task["executors"])
        for executor in task["executors"]:  # restarts are counted (other tests may have caused some)
            restarts = "cornserve_task_executor_restarts_total"
            assert any(n == restarts and ("executor", executor["executor_id"]) in ls for n, ls in page), page


async def test_metrics_needs_no_token(cluster: LocalCluster) -> None:
    """Scrapers get the page without a token; it carries counts and names, no payloads or ids."""
    async with gateway_session(cluster, timeout_s=60, anonymous=True) as anon:
        async with anon.get("/metrics") as resp:
            assert resp.status == 200
            assert "cornserve_gateway_http_requests_total" in await resp.text()
        async with anon.get("/apps") as resp:
            assert resp.status == 401


async def micro_stats(cluster: LocalCluster, service: str) -> list[dict[str, Any]]:
    """Every instance's reply to nats.micro's STATS discovery request for `service` (1 s to answer)."""
    nc = await admin_nats(cluster)
    try:
        inbox = nc.new_inbox()
        replies: list[dict[str, Any]] = []

        async def collect(msg: Any) -> None:
            replies.append(json.loads(msg.data))

        sub = await nc.subscribe(inbox, cb=collect)
        await nc.publish(f"$SRV.STATS.{service}", b"", reply=inbox)
        await asyncio.sleep(1.0)
        await sub.unsubscribe()
    finally:
        await nc.close()
    return replies


async def test_micro_stats_carry_real_numbers(
    cluster: LocalCluster, apps: None, http: aiohttp.ClientSession
) -> None:
    status, body = await call(http, "POST", f"/apps/{PIPE}/invoke", {"seed": 9, "n": 4})
    assert status == 200, body
    sidecars = await micro_stats(cluster, SIDECAR_SERVICE_NAME)
    assert len(sidecars) == cluster.cpu_slots
    assert all(ep["data"]["arena_bytes"] > 0 for s in sidecars for ep in s["endpoints"])
    (rm,) = await micro_stats(cluster, RM_SERVICE_NAME)
    data = rm["endpoints"][0]["data"]
    assert data["deployments"] >= 4 and data["devices"] == cluster.cpu_slots, data
    managers = await micro_stats(cluster, TM_SERVICE_NAME)
    assert managers and all(ep["data"]["ready"] >= 1 for m in managers for ep in m["endpoints"])

    async def four_routed() -> bool:
        # The pipeline's four calls, routed from the executor tables (counted once the dispatchers'
        # usage reports arrive) or by `route`; every endpoint of a task manager carries the same data.
        managers = await micro_stats(cluster, TM_SERVICE_NAME)
        return sum(m["endpoints"][0]["data"]["routed"] for m in managers) >= 4

    await wait_for(four_routed, 15, "the pipeline's four calls in the task managers' routed counts")
    dispatchers = await micro_stats(cluster, DISPATCHER_SERVICE_NAME)
    assert len(dispatchers) == 2 and all("graphs" in ep["data"] for d in dispatchers for ep in d["endpoints"])
