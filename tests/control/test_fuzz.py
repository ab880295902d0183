"""Fuzzing the gateway of the shared cluster from its OpenAPI document: no request gets a 5xx.

Two fuzz apps are registered first, so their invoke routes (one unary, one streaming) are in the
document with their request schemas and get schema-shaped bodies, valid ones that run real task
graphs and invalid ones that must be refused. Every operation is fuzzed with the admin token, and
again without a token or with a wrong one (those must all be 401, but for the open routes). Afterwards the gateway must still
serve: health, an invocation, and no traceback in its log.

The default suite runs a small, fixed-seed pass (`test_fuzz_gateway_quick`, a few hundred
requests). The large pass, a few thousand requests with a fresh seed, is behind the `fuzz` marker:

    python3 -m uv run --locked pytest -m fuzz tests/control/test_fuzz.py -s

(`CORNSERVE_FUZZ_SEED` repeats a run's seed, which it prints; `CORNSERVE_FUZZ_EXAMPLES` sets the
examples per operation and generation mode.)
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from schemathesis import Case, GenerationMode
from tests.control.fuzz_apps import FUZZ_APPS
from tests.control.fuzzing import REQUEST_TIMEOUT_S, FuzzStats, GatewayFuzzer, load_schema
from tests.control.support import admin_nats
from tests.support.tasklibs import TENSOR_MATH

from cornserve.bus.control import KV_TASKLIBS
from cornserve.bus.kv import open_bucket
from cornserve.cli.launcher import LocalCluster
from cornserve.gateway.auth import ROUTE_SCOPES

QUICK_EXAMPLES = 6
"""Per operation and generation mode in the default suite (about 350 requests in all)."""
FULL_EXAMPLES = int(os.environ.get("CORNSERVE_FUZZ_EXAMPLES", "100"))
"""Per operation and generation mode under `-m fuzz` (a few thousand requests)."""

DESTRUCTIVE = {"DELETE /apps/{name}"}
"""Operations fuzzed with made-up path values only (a real value would remove the fuzz apps)."""


@dataclass
class Target:
    cluster: LocalCluster
    admin: dict[str, str]
    http: requests.Session


DEPLOY_TIMEOUT_S = 300.0
"""Registering an app starts executor processes (each imports torch): slow on a loaded machine."""


def _admin_call(
    target: Target, method: str, path: str, body: object = None, timeout_s: float = REQUEST_TIMEOUT_S
) -> requests.Response:
    return target.http.request(
        method, target.cluster.url + path, json=body, headers=target.admin, timeout=timeout_s
    )


def _tasklib_names(target: Target) -> set[str]:
    reply = _admin_call(target, "GET", "/tasklibs")
    assert reply.status_code == 200, reply.text
    return {lib["name"] for lib in reply.json()}


async def _delete_tasklibs(cluster: LocalCluster, names: set[str]) -> None:
    """Remove libraries the fuzzer managed to upload (there is no route for it; services ignore deletes)."""
    nc = await admin_nats(cluster)
    try:
        kv = await open_bucket(nc, KV_TASKLIBS)
        for name in names:
            await kv.delete(name)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def target(cluster: LocalCluster) -> Iterator[Target]:
    """The fuzz apps registered on the shared cluster (unregistered afterwards, with whatever the fuzzer made)."""
    admin = {"Authorization": f"Bearer {cluster.admin_token}"}
    with requests.Session() as http:
        target = Target(cluster, admin, http)
        reply = _admin_call(
            target, "POST", "/tasklibs", {"name": TENSOR_MATH.name, "source": TENSOR_MATH.source}
        )
        assert reply.status_code == 201, reply.text
        libraries = _tasklib_names(target)
        for name, source in FUZZ_APPS.items():
            reply = _admin_call(target, "POST", "/apps", {"name": name, "source": source}, DEPLOY_TIMEOUT_S)
            assert reply.status_code == 201, reply.text
        try:
            yield target
        finally:
            for name in FUZZ_APPS:
                _admin_call(target, "DELETE", f"/apps/{name}", timeout_s=DEPLOY_TIMEOUT_S)
            made = _tasklib_names(target) - libraries
            if made:
                asyncio.run(_delete_tasklibs(cluster, made))


def _close_opened_session(target: Target) -> object:
    """After a fuzzed POST /sessions that opened one, close it: fuzzing must not fill the session cap."""

    def after(case: Case, response: requests.Response) -> None:
        if case.operation.label == "POST /sessions" and response.status_code == 201:
            closed = _admin_call(target, "DELETE", f"/sessions/{response.json()['session_id']}")
            assert closed.status_code == 200, closed.text

    return after


def fuzz_gateway(target: Target, examples: int, fuzz_seed: int) -> FuzzStats:
    """Every operation with the admin token (made-up and real path values; `POST /apps` and the invoke
    routes also asking for SSE), then without a valid token."""
    url = target.cluster.url
    fuzzer = GatewayFuzzer(url, load_schema(url, target.cluster.admin_token), fuzz_seed)
    operations = fuzzer.operations()
    labels = {op.label for op in operations}
    for name in FUZZ_APPS:
        assert f"POST /apps/{name}/invoke" in labels, sorted(labels)
    after = _close_opened_session(target)
    sse = {**target.admin, "Accept": "text/event-stream"}
    for operation in operations:
        fuzzer.fuzz(operation, examples, headers=target.admin, after=after)  # type: ignore[arg-type]
        if operation.method.upper() == "POST" and operation.path.startswith("/apps"):
            fuzzer.fuzz(operation, examples, headers=sse)  # registration progress and streams as SSE
        if operation.label in DESTRUCTIVE:
            continue
        if "{name}" in operation.path:
            real = {"name": random.Random(fuzz_seed).choice(sorted(FUZZ_APPS))}
        elif "{id}" in operation.path:  # a live session, fresh for each operation (DELETE closes it)
            opened = _admin_call(target, "POST", "/sessions", {})
            assert opened.status_code == 201, opened.text
            real = {"id": opened.json()["session_id"]}
        else:
            continue  # task keys: scaling a real task would deploy executors
        fuzzer.fuzz(operation, examples, headers=target.admin, path_parameters=real, after=after)  # type: ignore[arg-type]
        if "id" in real:
            _admin_call(target, "DELETE", f"/sessions/{real['id']}")
    for operation in operations:
        if ROUTE_SCOPES.get((operation.method.upper(), operation.path)) == "open":  # /health, /metrics
            continue
        for token in ({}, {"Authorization": "Bearer not-a-token-of-this-gateway"}):
            fuzzer.fuzz(
                operation,
                max(2, examples // 4),
                headers=token,
                modes=(GenerationMode.POSITIVE,),
                expect=lambda status: status == 401,
            )
    return fuzzer.stats


def _gateway_log(target: Target) -> tuple[bool, Path]:
    gateway = next(c for c in target.cluster.children if c.name == "gateway")
    return gateway.alive(), gateway.log_path


def assert_gateway_serves(target: Target, log_offset: int) -> None:
    """Still up after the fuzzing: healthy, invoking an app works, and it logged no traceback meanwhile."""
    health = target.http.get(target.cluster.url + "/health", timeout=REQUEST_TIMEOUT_S)
    assert health.status_code == 200, health.text
    reply = _admin_call(target, "POST", "/apps/fuzz-sum/invoke", {"seed": 1, "shape": {"rows": 2, "cols": 3}})
    assert reply.status_code == 200 and reply.json()["shape"] == [2, 3], reply.text
    alive, log_path = _gateway_log(target)
    assert alive
    with log_path.open("rb") as log:  # only what this run wrote: the cluster is shared
        log.seek(log_offset)
        written = log.read().decode(errors="replace")
    assert "Traceback" not in written, written[-5000:]


def _check(stats: FuzzStats) -> None:
    print(stats.summary())
    failures = stats.failures()
    assert not failures, f"{len(failures)} failing request(s):\n" + "\n".join(failures[:20])


@pytest.mark.timeout(900)  # registering the apps starts three executors (slow on a loaded machine)
@pytest.mark.fuzz
def test_fuzz_gateway_quick(target: Target) -> None:
    log_offset = _gateway_log(target)[1].stat().st_size
    stats = fuzz_gateway(target, QUICK_EXAMPLES, fuzz_seed=11)
    _check(stats)
    assert_gateway_serves(target, log_offset)


@pytest.mark.fuzz
@pytest.mark.timeout(3600)
def test_fuzz_gateway_full(target: Target) -> None:
    fuzz_seed = int(os.environ.get("CORNSERVE_FUZZ_SEED") or random.randrange(2**32))
    print(f"fuzz seed: {fuzz_seed} (CORNSERVE_FUZZ_SEED={fuzz_seed} repeats this run)")
    log_offset = _gateway_log(target)[1].stat().st_size
    stats = fuzz_gateway(target, FULL_EXAMPLES, fuzz_seed)
    _check(stats)
    assert_gateway_serves(target, log_offset)
