"""The fault matrix: a steady load of invocations while one part of a local cluster is killed.

For each fault (kill -9 of an executor, a task manager, a sidecar, a dispatcher, the resource
manager, the gateway; a kill -9 and restart of nats-server) a fresh load of at least
`MIN_REQUESTS` invocations of the tensor-math pipeline app runs through a cluster supervised as
`cornserve up` supervises it. Every request ends as one of:

- ok: 200 with the right answer;
- clean error: an HTTP error with the gateway's JSON error body, or a refused/reset connection
  while the gateway itself is down (the client learns at once);
- hung: no answer within `HUNG_AFTER_S` (must never happen).

Recovery time is from the kill to the start of the first request after which every request
succeeded. After the last fault the cluster stops and no process it ever ran (services, task
managers, executors) nor any shared-memory file may be left.

Out of the default run (marker `faults`): `pytest -m faults tests/faults -s` prints the table;
`CORNSERVE_FAULT_MATRIX_OUT=<file>` also writes it as JSON. docs/reliability.md has the figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from tests.faults.support import (
    FAULTS,
    MIN_REQUESTS,
    RECOVERY_BUDGET_S,
    FaultResult,
    Matrix,
    collect_pids,
    run_fault,
    supervised_cluster,
)

pytestmark = pytest.mark.faults

RESULTS: list[FaultResult] = []


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    try:
        with supervised_cluster(tmp_path_factory.mktemp("faults")) as state:
            yield state
    finally:
        _report()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_fault(matrix: Matrix, fault: str) -> None:
    await collect_pids(matrix)
    result, what = await run_fault(matrix, fault, seed_base=1000 * (len(RESULTS) + 1))
    RESULTS.append(result)
    await collect_pids(matrix)
    log = "\n".join(matrix.said)
    assert result.hung == 0, (what, result)
    unclean = {
        k: v for k, v in result.errors.items() if not k[0].isdigit() and not k.startswith("connection")
    }
    assert not unclean, (what, result)
    assert result.ok + result.clean_error == result.requests, (what, result)
    assert result.recovery_s is not None, (
        f"not recovered {RECOVERY_BUDGET_S:.0f} s after {what}: {result}\n{log}"
    )
    assert result.requests >= MIN_REQUESTS, result


def _report() -> None:
    lines = [
        f"{'fault':<18}{'requests':>9}{'ok':>6}{'clean error':>13}{'hung':>6}{'recovery s':>12}  errors",
    ]
    for r in RESULTS:
        recovery = "never" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(r.errors.items())) or "-"
        lines.append(
            f"{r.fault:<18}{r.requests:>9}{r.ok:>6}{r.clean_error:>13}{r.hung:>6}{recovery:>12}  {errors}"
        )
    print("\nfault matrix (kill -9 under load; pytest -m faults tests/faults -s)\n" + "\n".join(lines))
    out = os.environ.get("CORNSERVE_FAULT_MATRIX_OUT")
    if out:
        Path(out).write_text(json.dumps([asdict(r) for r in RESULTS], indent=2))
