"""Helpers of the control-plane tests: JSON calls on the gateway, the tensor-math task library."""

from __future__ import annotations

from typing import Any

import aiohttp
from nats.aio.client import Client
from tests.support.tasklibs import TENSOR_MATH, TENSOR_MATH_PATH

from cornserve.cli.launcher import LocalCluster
from cornserve.runtime.nats import connect_nats

TASKLIB = TENSOR_MATH_PATH
tensor_math = TENSOR_MATH.load()
make_matrix_tensor = tensor_math.make_matrix_tensor

__all__ = [
    "TASKLIB",
    "admin_nats",
    "call",
    "ensure_tasklib",
    "expected_sum",
    "make_matrix_tensor",
    "tasks_by_key",
    "tensor_math",
]


def expected_sum(seed: int, n: int) -> float:
    """What the pipeline app answers for (seed, n): sum(A @ B)."""
    return float((make_matrix_tensor(seed, n, n) @ make_matrix_tensor(seed + 1, n, n)).sum())


async def admin_nats(cluster: LocalCluster) -> Client:
    """A NATS connection to the cluster with the admin role (the cluster's NATS refuses anonymous ones)."""
    assert cluster.nats_url is not None
    return await connect_nats(cluster.nats_url, name="cornserve-tests", creds=cluster.nats_admin_creds)


async def call(http: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One JSON request: (status, JSON body)."""
    async with http.request(method, path, json=body) as response:
        return response.status, await response.json()


async def tasks_by_key(http: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    """GET /tasks as {key: task}."""
    status, body = await call(http, "GET", "/tasks")
    assert status == 200, body
    return {t["key"]: t for t in body["tasks"]}


async def ensure_tasklib(http: aiohttp.ClientSession) -> None:
    """Upload the tensor-math task library (idempotent: same name, same source)."""
    status, body = await call(
        http, "POST", "/tasklibs", {"name": TENSOR_MATH.name, "source": TENSOR_MATH.source}
    )
    assert status == 201, body
