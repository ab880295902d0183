"""The images' health check (deploy/docker/healthcheck.py) with a NATS cluster's URL list (deploy/k8s)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _check(url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CORNSERVE_HEALTHCHECK_URL"}
    env["CORNSERVE_NATS_URL"] = url
    return subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthy_while_any_server_of_the_list_accepts(listening: int) -> None:
    closed = _closed_port()
    assert _check(f"nats://127.0.0.1:{listening}").returncode == 0
    assert _check(f"nats://127.0.0.1:{closed},nats://127.0.0.1:{listening}").returncode == 0


def test_unhealthy_when_none_accepts_naming_each() -> None:
    closed = _closed_port()
    result = _check(f"nats://127.0.0.1:{closed}, nats://bad:port")
    assert result.returncode == 1
    assert f"nats://127.0.0.1:{closed}" in result.stderr and "nats://bad:port" in result.stderr
