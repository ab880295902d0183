"""How the spawner reads a task-manager pod from the API: running, exited (with code), or why not running."""

from __future__ import annotations

from typing import Any

from cornserve.resource_manager.k8s_pods import ANNOTATION_TASK_KEY
from cornserve.resource_manager.k8s_state import pod_state


def _pod(phase: str, *, container: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    statuses = [{"name": "task-manager", "state": container}] if container is not None else []
    return {
        "metadata": {
            "name": "cornserve-tm-x-abcde",
            "annotations": {ANNOTATION_TASK_KEY: "x"},
            "creationTimestamp": "2026-12-01T10:00:00Z",
        },
        "spec": {"nodeName": "worker-0"},
        "status": {"phase": phase, "containerStatuses": statuses, **status},
    }


def test_a_running_pod_has_no_exit_code() -> None:
    state = pod_state(_pod("Running", container={"running": {"startedAt": "2026-12-01T10:00:01Z"}}))
    assert state is not None
    assert (state.task_key, state.exit_code, state.node_name, state.detail) == ("x", None, "worker-0", "")


def test_an_exited_container_gives_its_code_and_reason() -> None:
    state = pod_state(
        _pod("Failed", container={"terminated": {"exitCode": 3, "reason": "Error", "message": "boom"}})
    )
    assert state is not None and state.exit_code == 3
    assert "Error" in state.detail and "boom" in state.detail and "code 3" in state.detail


def test_a_pod_that_cannot_pull_or_schedule_is_pending_with_the_reason() -> None:
    state = pod_state(
        _pod("Pending", container={"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}})
    )
    assert (
        state is not None and state.exit_code is None and "(ImagePullBackOff): no such image" in state.detail
    )
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes: Insufficient nvidia.com/gpu",
    }
    state = pod_state(_pod("Pending", conditions=[unschedulable]))
    assert state is not None and "Insufficient nvidia.com/gpu" in state.summary()


def test_an_evicted_pod_has_ended_without_a_container_code() -> None:
    state = pod_state(_pod("Failed", reason="Evicted", message="low on memory"))
    assert state is not None and state.exit_code == -1 and "Evicted" in state.detail


def test_other_pods_and_garbage_are_not_task_managers() -> None:
    assert pod_state({"metadata": {"name": "p"}}) is None
    assert pod_state({"metadata": "nonsense", "status": 5}) is None
    odd = _pod("Running")
    odd["status"]["containerStatuses"] = "nonsense"
    state = pod_state(odd)
    assert state is not None and state.exit_code is None


def test_a_failed_credentials_copy_says_so() -> None:
    pod = _pod("Failed")
    pod["status"]["initContainerStatuses"] = [
        {
            "name": "credentials",
            "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "install: cannot stat"}},
        }
    ]
    state = pod_state(pod)
    assert state is not None and state.exit_code == -1
    assert "init container credentials exited (Error, code 1): install: cannot stat" in state.detail
