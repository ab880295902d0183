"""Task managers get the task-manager role's NATS credentials, never the resource manager's."""

from __future__ import annotations

from pathlib import Path

from cornserve.resource_manager.spawner import task_manager_env

RM_ENV = {
    "PATH": "/usr/bin",
    "CORNSERVE_NATS_CREDS": "/auth/resource-manager.json",
    "CORNSERVE_TASK_MANAGER_NATS_CREDS": "/auth/task-manager.json",
    "CORNSERVE_EXECUTOR_NATS_CREDS": "/auth/executor.json",
}


def test_the_task_manager_role_replaces_the_resource_managers_credentials() -> None:
    env = task_manager_env(RM_ENV, Path("/auth/task-manager.json"))
    assert env["CORNSERVE_NATS_CREDS"] == "/auth/task-manager.json"
    assert "CORNSERVE_TASK_MANAGER_NATS_CREDS" not in env
    assert env["CORNSERVE_EXECUTOR_NATS_CREDS"] == "/auth/executor.json"  # the task manager hands it on
    assert env["PATH"] == "/usr/bin"


def test_without_task_manager_credentials_the_task_manager_gets_none() -> None:
    env = task_manager_env(RM_ENV, None)
    assert "CORNSERVE_NATS_CREDS" not in env
