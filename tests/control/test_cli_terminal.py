"""The `cornserve` command against the shared cluster: plain lines through a pipe, rich on a terminal, logs.

Through a pipe (how scripts and the other tests run it) output has no escape codes and keeps its
line format; on a pseudo-terminal the same commands draw tables, colours and live deploy bars.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from tests.control.apps import SUM_APP
from tests.control.support import TASKLIB
from tests.support.terminal import run_in_terminal

from cornserve.cli.launcher import LocalCluster
from cornserve.client import CornserveClient

DEADLINE_S = 300
ESC = "\x1b["


def _env(cluster: LocalCluster) -> dict[str, str]:
    return {**os.environ, "CORNSERVE_URL": cluster.url, "CORNSERVE_STATE_DIR": str(cluster.state_dir)}


def cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cornserve.cli.main", *args],
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )


def terminal(cluster: LocalCluster, *args: str) -> tuple[int, str]:
    return run_in_terminal([sys.executable, "-m", "cornserve.cli.main", *args], _env(cluster), DEADLINE_S)


def test_status_is_plain_through_a_pipe_and_a_table_on_a_terminal(cluster: LocalCluster) -> None:
    piped = cli(cluster, "status")
    assert piped.returncode == 0 and ESC not in piped.stdout, piped.stdout + piped.stderr
    assert f"cluster at {cluster.url}: ok" in piped.stdout and "services: " in piped.stdout
    code, text = terminal(cluster, "status")
    assert code == 0 and ESC in text, text
    assert "SERVICE" in text and "REPLICAS" in text and "cornserve-dispatcher" in text
    assert "services: " not in text  # the table replaced the line


def test_logs_of_a_service_and_of_an_unknown_target(cluster: LocalCluster) -> None:
    out = cli(cluster, "logs", "gateway", "--tail", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert 0 < len(lines) <= 3 and not lines[0].startswith("gateway |"), lines
    unknown = cli(cluster, "logs", "no-such-app")  # neither a log nor an app: the gateway says 404
    assert unknown.returncode == 1 and "no task, app or service named 'no-such-app'" in unknown.stderr


@pytest.mark.slow
def test_register_on_a_terminal_then_logs_of_the_task_and_the_app(cluster: LocalCluster) -> None:
    assert cli(cluster, "tasklib", "add", str(TASKLIB), "--name", "tensor-math").returncode == 0
    app_file = cluster.state_dir / "term_sums.py"
    app_file.write_text(SUM_APP)
    code, text = terminal(cluster, "register", str(app_file), "--name", "term-sums")
    try:
        assert code == 0, text
        assert ESC in text and "✔" in text and "term-sums" in text and "ready" in text, text
        apps = cli(cluster, "apps")
        assert ESC not in apps.stdout and apps.stdout.splitlines()[0].split() == [
            "NAME",
            "STATE",
            "STREAMS",
            "TASKS",
        ]
        code, table = terminal(cluster, "apps")
        assert code == 0 and "term-sums" in table and "NAME" in table and "---" not in table, table
        out = cli(cluster, "invoke", "term-sums", '{"seed": 1}')
        assert out.returncode == 0 and "sum" in json.loads(out.stdout), out.stderr
        code, pretty = terminal(cluster, "invoke", "term-sums", '{"seed": 1}')
        assert code == 0 and ESC in pretty and '"sum"' in pretty, pretty  # coloured JSON on a terminal
        keys = [t["key"] for t in json.loads(_app_json(cluster, "term-sums"))["tasks"]]
        assert len(keys) == 2
        task_logs = cli(cluster, "logs", keys[0], "--tail", "0")
        assert task_logs.returncode == 0, task_logs.stderr
        prefixes = {line.split(" | ", 1)[0] for line in task_logs.stdout.splitlines() if " | " in line}
        assert f"tm-{keys[0]}" in prefixes and any(p.startswith(f"{keys[0]}.") for p in prefixes), prefixes
        app_logs = cli(cluster, "logs", "term-sums", "--tail", "0")
        assert app_logs.returncode == 0, app_logs.stderr
        app_prefixes = {line.split(" | ", 1)[0] for line in app_logs.stdout.splitlines() if " | " in line}
        assert {f"tm-{keys[0]}", f"tm-{keys[1]}"} <= app_prefixes, app_prefixes
    finally:
        assert cli(cluster, "unregister", "term-sums").returncode == 0


def _app_json(cluster: LocalCluster, name: str) -> str:
    """GET /apps/{name} through the Python client, as JSON text."""

    async def get() -> str:
        async with CornserveClient(cluster.url, token=cluster.admin_token) as client:
            return (await client.get_app(name)).model_dump_json()

    return asyncio.run(get())
