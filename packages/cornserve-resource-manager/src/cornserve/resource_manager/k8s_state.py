"""What the `kubernetes` spawner knows about one task-manager pod, read from the API's Pod object.

A pure function of the Pod (as the API's JSON), so the rules — when a pod counts as exited, which
exit code, what an operator should be told — are tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cornserve.resource_manager.k8s_pods import ANNOTATION_TASK_KEY, CONTAINER


@dataclass(frozen=True)
class PodState:
    """One task-manager pod as last listed."""

    name: str
    task_key: str
    phase: str
    """Pending, Running, Succeeded, Failed or Unknown."""
    created: str
    """creationTimestamp (RFC 3339): the newest pod of a key is the current one."""
    node_name: str | None
    exit_code: int | None
    """None while the pod may still run; its container's exit code once it ended (-1 when unknown)."""
    detail: str
    """Why it is not running, from the container's and the scheduler's reasons (empty when it runs)."""
    deleting: bool

    def summary(self) -> str:
        """One line for error messages: pod, node, phase and the reason if any."""
        where = f" on node {self.node_name}" if self.node_name else " (not scheduled)"
        line = f"pod {self.name}{where}: {self.phase}"
        if self.deleting:
            line += " (being deleted)"
        return f"{line}; {self.detail}" if self.detail else line


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def pod_state(pod: dict[str, Any]) -> PodState | None:
    """The state of a task-manager pod, or None when `pod` is not one (no task-key annotation).

    The API's objects are input from the network: every field is looked up defensively.
    """
    meta = _dict(pod.get("metadata"))
    task_key = _text(_dict(meta.get("annotations")).get(ANNOTATION_TASK_KEY))
    name = _text(meta.get("name"))
    if not task_key or not name:
        return None
    status = _dict(pod.get("status"))
    spec = _dict(pod.get("spec"))
    phase = _text(status.get("phase")) or "Pending"
    details: list[str] = []
    exit_code: int | None = None
    for cs in map(_dict, _list(status.get("containerStatuses"))):
        if cs.get("name") != CONTAINER:
            continue
        state = _dict(cs.get("state"))
        terminated = state.get("terminated")
        waiting = state.get("waiting")
        if isinstance(terminated, dict):
            code = terminated.get("exitCode")
            exit_code = code if isinstance(code, int) else -1
            details.append(_reason("exited", terminated, code))
        elif isinstance(waiting, dict) and waiting.get("reason") not in (None, "ContainerCreating"):
            details.append(_reason("waiting", waiting, None))
    for cs in map(_dict, _list(status.get("initContainerStatuses"))):
        state = _dict(cs.get("state"))
        terminated, waiting = _dict(state.get("terminated")), _dict(state.get("waiting"))
        what = f"init container {_text(cs.get('name')) or '?'}"
        if terminated and terminated.get("exitCode") != 0:
            details.append(_reason(f"{what} exited", terminated, terminated.get("exitCode")))
        elif waiting and waiting.get("reason") not in (None, "PodInitializing"):
            details.append(_reason(f"{what} waiting", waiting, None))
    for cond in map(_dict, _list(status.get("conditions"))):
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            details.append(_reason("not scheduled", cond, None))
    if phase in ("Succeeded", "Failed") and exit_code is None:
        exit_code = -1  # evicted or failed before the container ran
        if _text(status.get("reason")):
            details.append(_reason("pod", status, None))
    return PodState(
        name=name,
        task_key=task_key,
        phase=phase,
        created=_text(meta.get("creationTimestamp")),
        node_name=_text(spec.get("nodeName")) or None,
        exit_code=exit_code,
        detail="; ".join(details),
        deleting=meta.get("deletionTimestamp") is not None,
    )


def _reason(what: str, obj: dict[str, Any], code: Any) -> str:
    reason = _text(obj.get("reason")) or "unknown reason"
    message = _text(obj.get("message"))
    text = f"{what} ({reason}" + (f", code {code}" if code is not None else "") + ")"
    return f"{text}: {message}" if message else text
