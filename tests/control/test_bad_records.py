"""Version-tolerant state on real processes: unreadable records in every KV bucket stop no service.

An app is registered, then every bucket (apps, task libraries, deployments) gets records no reader
can use: bytes that are not JSON, a record from a newer Cornserve (`schema_version` 99), and a task
library whose source fails to load (it calls sys.exit). Every service then restarts, as on the next
`cornserve up`: each must start, log what it skipped, and serve: the app registered before is
recovered and invokes, a new app registers and invokes, and the unreadable records are still there
(skipped, never deleted). The test removes them (and its apps) afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from tests.control.apps import SUM_APP
from tests.control.support import admin_nats, call, ensure_tasklib, make_matrix_tensor

from cornserve.bus.control import KV_APPS, KV_DEPLOYMENTS, KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.kv import kv_put, open_bucket
from cornserve.cli.launcher import LocalCluster

DEADLINE = 120.0
BEFORE, AFTER = "kvtol-before", "kvtol-after"
SERVICES = ("resource-manager", "dispatcher-0", "dispatcher-1", "gateway")
SKIP_LINE = "skipping unreadable record in KV bucket"


def future_record(name: str) -> bytes:
    """A record as a newer Cornserve with an incompatible schema might write it."""
    return json.dumps({"schema_version": 99, "name": name, "task_key": name, "layout": "v99"}).encode()


BAD: dict[str, dict[str, bytes]] = {
    bucket: {"kvtol-garbage": b"\xff{not json", "kvtol-future": future_record("kvtol-future")}
    for bucket in (KV_APPS, KV_TASKLIBS, KV_DEPLOYMENTS)
}
BROKEN_LIBRARY = TaskLibraryRecord(
    name="kvtol-broken",
    source="import sys\nsys.exit(3)\n",
    sha256="0" * 64,
    unit_tasks=[],
    descriptors=[],
    created_at=time.time(),
)


def expected(seed: int) -> float:
    return float(make_matrix_tensor(seed, 3, 3).sum())


async def invoke(http: aiohttp.ClientSession, app: str, seed: int) -> None:
    status, body = await call(http, "POST", f"/apps/{app}/invoke", {"seed": seed})
    assert status == 200, body
    assert body["sum"] == pytest.approx(expected(seed), rel=1e-4, abs=1e-4)


async def wait_serving(cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    """Until the restarted gateway is healthy and has recovered BEFORE (failing with its log if not)."""
    gateway = next(c for c in cluster.children if c.name == "gateway")
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                for child in cluster.children:
                    assert child.alive(), f"{child.name} exited after the restart:\n{child.log_tail(40)}"
                try:
                    status, apps = await call(http, "GET", "/apps")
                except (aiohttp.ClientError, json.JSONDecodeError):
                    status, apps = 0, []
                if status == 200 and any(a["name"] == BEFORE and a["state"] == "ready" for a in apps):
                    return
                await asyncio.sleep(0.3)
    except TimeoutError:
        raise AssertionError(
            f"the gateway did not recover {BEFORE}; its log:\n{gateway.log_tail(40)}"
        ) from None


def log_sizes(cluster: LocalCluster) -> dict[str, int]:
    return {c.name: c.log_path.stat().st_size for c in cluster.children if c.name in SERVICES}


def log_since(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@pytest.mark.slow
async def test_unreadable_records_in_every_bucket_stop_no_service(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    await ensure_tasklib(http)
    status, body = await call(http, "POST", "/apps", {"name": BEFORE, "source": SUM_APP})
    assert status == 201, body
    nc = await admin_nats(cluster)
    try:
        buckets = {name: await open_bucket(nc, name) for name in BAD}
        try:
            for name, records in BAD.items():
                for key, raw in records.items():
                    await buckets[name].put(key, raw)
            await kv_put(buckets[KV_TASKLIBS], BROKEN_LIBRARY.name, BROKEN_LIBRARY)

            offsets = log_sizes(cluster)
            for service in SERVICES:  # as on the next `up`: every service starts over on this state
                await asyncio.to_thread(cluster.restart, service)
            await wait_serving(cluster, http)

            await invoke(http, BEFORE, 4)
            status, body = await call(http, "POST", "/apps", {"name": AFTER, "source": SUM_APP})
            assert status == 201, body
            await invoke(http, AFTER, 6)
            status, apps = await call(http, "GET", "/apps")
            assert status == 200 and sorted(a["name"] for a in apps if a["name"].startswith("kvtol-")) == [
                AFTER,
                BEFORE,
            ]
            status, libraries = await call(http, "GET", "/tasklibs")
            assert status == 200 and "kvtol-garbage" not in {lib["name"] for lib in libraries}

            # Each service said what it skipped, by bucket and key; none of them quoted the value.
            logs = {
                c.name: log_since(c.log_path, offsets[c.name]) for c in cluster.children if c.name in SERVICES
            }
            wanted = {
                "gateway": (KV_APPS, KV_TASKLIBS),
                "resource-manager": (KV_DEPLOYMENTS, KV_TASKLIBS),
                "dispatcher-0": (KV_TASKLIBS,),
                "dispatcher-1": (KV_TASKLIBS,),
            }
            for service, names in wanted.items():
                for name in names:
                    for key in BAD[name]:
                        line = f"{SKIP_LINE} {name}: key '{key}'"
                        assert line in logs[service], f"{service} did not log {line!r}:\n{logs[service]}"
                assert "task library 'kvtol-broken'" in logs[service] and "SystemExit" in logs[service]
                assert "v99" not in logs[service]
            for child in cluster.children:
                assert child.alive(), f"{child.name} died"

            # Skipped, not deleted: every unreadable record is still stored as it was written.
            for name, records in BAD.items():
                for key, raw in records.items():
                    assert (await buckets[name].get(key)).value == raw
        finally:
            for name, records in BAD.items():
                for key in records:
                    await buckets[name].delete(key)
            await buckets[KV_TASKLIBS].delete(BROKEN_LIBRARY.name)
    finally:
        await nc.close()
        for app in (AFTER, BEFORE):
            status, body = await call(http, "DELETE", f"/apps/{app}")
            assert status in (200, 404), body
