"""Fixtures of the resource-manager tests: a real RM process per call of `start_rm`, over a real nats-server.

Teardown stops every RM (SIGTERM), which leaves the data plane running on purpose, then stops the
task managers from the RM's process records, as `cornserve up` does at a full shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from tests.resource_manager.support import CPU_SLOTS, RM, StartRM, clear_deployments
from tests.support.processes import ServiceProcess, pids_matching, python_module
from tests.support.tasklibs import ECHO, upload_library
from tests.support.waiting import wait_answering, wait_gone

from cornserve.runtime.detached import DetachedGroups

RECONCILE_INTERVAL_S = 1.0
"""The RMs of these tests reconcile every second, so a repair shows within a short deadline."""


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    await upload_library(nats_url, ECHO)
    await clear_deployments(client)
    yield client
    await clear_deployments(client)
    await client.close()


@pytest.fixture
async def start_rm(nats_url: str, nc: Client, tmp_path: Path) -> AsyncIterator[StartRM]:
    started: list[RM] = []

    async def start(*flags: str) -> RM:
        service = ServiceProcess.start(
            f"rm-{len(started)}",
            python_module(
                "cornserve.resource_manager.main",
                "--nats-url", nats_url,
                "--cpu-slots", str(CPU_SLOTS),
                "--device-kind", "cpu",
                "--log-dir", str(tmp_path / "logs"),
                "--reconcile-interval", str(RECONCILE_INTERVAL_S),
                *flags,
            ),
            tmp_path,
        )  # fmt: skip
        rm = RM(nc, service)
        started.append(rm)

        await wait_answering(
            lambda: rm.client.state(2), 60, "the resource manager to answer", process=service
        )
        return rm

    yield start
    for rm in started:
        if rm.proc.poll() is None:
            assert rm.service.stop(timeout=60) == 0, rm.log_text()
        assert "Traceback" not in rm.log_text(), rm.log_text()
    # The RM leaves its task managers running; the full shutdown stops them from its records.
    DetachedGroups(tmp_path / "logs" / "task-managers").stop_all(grace_s=20)
    await wait_gone(pids_matching("cornserve.task_manager.main", str(tmp_path / "logs")))


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORNSERVE_NATS_URL", raising=False)
