"""Helpers of the control-plane tests: JSON calls on the gateway, the tensor-math task library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
TASKLIB = ROOT / "tests" / "executor" / "tasklib_tensor_math.py"
if str(TASKLIB.parent) not in sys.path:
    sys.path.insert(0, str(TASKLIB.parent))
import tasklib_tensor_math as tensor_math  # noqa: E402
from tasklib_tensor_math import make_matrix_tensor  # noqa: E402

__all__ = [
    "TASKLIB",
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
        http, "POST", "/tasklibs", {"name": "tensor-math", "source": TASKLIB.read_text()}
    )
    assert status == 201, body
