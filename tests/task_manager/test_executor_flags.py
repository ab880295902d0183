"""The task manager refuses a task whose config passes an executor flag that widens exposure.

The gateway checks task configs too; this is the second check, where the command line is built, for
a task that reached the resource manager some other way. Real task-manager processes on a real
nats-server; no executor is ever started (the task is a vLLM one and this machine has no GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import nats
from tests.support.processes import ServiceProcess, python_module
from tests.support.waiting import wait_answering

from cornserve.bus.tm_client import TaskManagerClient
from cornserve.task import serialize_task
from cornserve.task.builtins import LLMTask, VLLMDescriptor

DEADLINE_S = 60.0


def start_tm(
    nats_url: str, log_dir: Path, name: str, env: dict[str, str] | None = None
) -> tuple[str, ServiceProcess]:
    task = LLMTask(model_id="org/model", descriptor=VLLMDescriptor(extra_args=["--host", "0.0.0.0"]))
    key = task.deployment_key
    command = python_module(
        "cornserve.task_manager.main",
        "--task-key", key,
        "--task-json", json.dumps(serialize_task(task)),
        "--nats-url", nats_url,
        "--log-dir", str(log_dir),
    )  # fmt: skip
    return key, ServiceProcess.start(name, command, log_dir, env)


def test_a_denied_flag_stops_the_task_manager_before_any_executor(nats_url: str, tmp_path: Path) -> None:
    _, tm = start_tm(nats_url, tmp_path, "tm-refused")
    code = tm.wait_exit(DEADLINE_S)
    log = tm.log()
    assert code != 0, log
    assert "--host" in log and "CORNSERVE_ALLOW_EXECUTOR_FLAGS=--host" in log, log
    assert "Traceback" not in log, log


async def test_the_admin_setting_lets_the_task_manager_serve(nats_url: str, tmp_path: Path) -> None:
    key, tm = start_tm(nats_url, tmp_path, "tm-allowed", {"CORNSERVE_ALLOW_EXECUTOR_FLAGS": "--host"})
    nc = await nats.connect(nats_url)
    try:
        status = await wait_answering(
            lambda: TaskManagerClient(nc, key).status(10.0),
            DEADLINE_S,
            "the task manager to answer",
            process=tm,
        )
        assert status.task_key == key and status.executors == []
    finally:
        await nc.close()
        tm.stop()
    tm.assert_clean_exit(stopped_line=None)


def test_a_typo_in_the_admin_setting_is_a_usage_error(nats_url: str, tmp_path: Path) -> None:
    _, tm = start_tm(nats_url, tmp_path, "tm-typo", {"CORNSERVE_ALLOW_EXECUTOR_FLAGS": "--hots"})
    code = tm.wait_exit(DEADLINE_S)
    assert code == 2, tm.log()
    assert "is not one of the refused executor flags" in tm.log()
