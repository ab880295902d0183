"""Executors get the executor role's NATS credentials, never their task manager's (variables are inherited)."""

from __future__ import annotations

from pathlib import Path

from cornserve.task_manager.executor import executor_env

MANAGER_ENV = {
    "PATH": "/usr/bin",
    "CORNSERVE_NATS_URL": "nats://old:4222",
    "CORNSERVE_NATS_CREDS": "/auth/task-manager.json",
    "CORNSERVE_EXECUTOR_NATS_CREDS": "/auth/executor.json",
}


def test_the_executor_role_replaces_the_managers_credentials() -> None:
    env = executor_env(MANAGER_ENV, "nats://new:4222", Path("/auth/executor.json"))
    assert env["CORNSERVE_NATS_CREDS"] == "/auth/executor.json"
    assert env["CORNSERVE_NATS_URL"] == "nats://new:4222"
    assert "CORNSERVE_EXECUTOR_NATS_CREDS" not in env
    assert env["PATH"] == "/usr/bin"


def test_without_executor_credentials_the_executor_gets_none() -> None:
    env = executor_env(MANAGER_ENV, "nats://new:4222", None)
    assert "CORNSERVE_NATS_CREDS" not in env and "CORNSERVE_EXECUTOR_NATS_CREDS" not in env
