"""Fresh DataForward ids for a graph sent again after its first replica died.

The dead replica may already have had producers send some forwards to sidecars under the graph's
ids; reusing them on a retry could let a consumer receive the stale copy (or a sidecar refuse a
second send of the same id). Every forward id is replaced consistently (producer output and every
consumer input carry the same id), and the outputs are mapped back so the app's recorded graph
sees the ids it created.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from cornserve.task import TaskInvocation
from cornserve.task.forward import iter_forwards


def forward_ids(invocations: Iterable[TaskInvocation]) -> set[str]:
    """Every DataForward id in the graph's inputs and outputs."""
    ids: set[str] = set()
    for inv in invocations:
        for fwd in [*iter_forwards(inv.task_input), *iter_forwards(inv.task_output)]:
            ids.add(fwd.id)
    return ids


def fresh_ids(ids: Iterable[str]) -> dict[str, str]:
    """A new random id (same format as DataForward's default) for each id."""
    return {old: uuid.uuid4().hex for old in ids}


def replace_ids(value: Any, mapping: dict[str, str]) -> Any:
    """A copy of JSON `value` with every string found in `mapping` replaced (ids are random hex)."""
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, list):
        return [replace_ids(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: replace_ids(v, mapping) for k, v in value.items()}
    return value
