"""Placement rules: which free devices, on which node, each new executor of a task gets.

Pure functions over the free devices by node (no I/O), so every rule is unit-tested on its own:

1. **One node per executor.** An executor's devices are all on one node (its tensors move between
   its devices through that node's shared memory or GPU links).
2. **Constraints.** A task's `NodePlacement` (a pinned node, or allowed nodes in order of
   preference) is a hard limit; nodes outside it are never used.
3. **Spread replicas.** A task's next executor goes to the allowed node holding the fewest of its
   executors, so losing one node leaves the others serving (unless the backend runs a task's
   executors beside its one task manager, `PlacementRequest.one_node`: then all on one node).
4. **Preference order.** Then the earlier node of the constraint's `nodes` list.
5. **Affinity.** Then a node that already runs a task of the same owner (app or session): an app's
   encoder and LLM are deployed for the same owner, and on one node their forwards take the
   shared-memory path instead of TCP. The resource manager does not see a graph's forward edges
   when it deploys; "same owner" is what it knows of producer and consumer.
6. Then the node with the most free devices, then the node name (a stable order).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cornserve.bus.control import DeviceInfo
from cornserve.bus.micro import ServiceFault
from cornserve.task import NodePlacement


@dataclass(frozen=True)
class PlacementRequest:
    """What one placement decision needs besides the free devices."""

    task_key: str
    per_executor: int
    """Devices one executor needs."""
    count: int
    """New executors to place."""
    constraint: NodePlacement | None = None
    placed: Counter[str] = field(default_factory=Counter)
    """Executors of this task already running, by node (for spreading)."""
    affinity: frozenset[str] = frozenset()
    """Nodes running a task of the same owner (for shared-memory forwards)."""
    one_node: bool = False
    """Every executor of the task on one node (a backend whose executors run beside their task
    manager): the node of its running executors, or the one the first new executor gets."""


def place(
    free: Mapping[str, Sequence[DeviceInfo]],
    known: Mapping[str, int],
    down: frozenset[str],
    req: PlacementRequest,
) -> list[list[DeviceInfo]]:
    """One list of devices per new executor, each on one node; a typed fault when it cannot be done.

    `free`: the free devices of every node that is up, lowest index first; `known`: every node of
    the inventory (up or down) with its number of devices; `down`: nodes known but unavailable.
    """
    allowed = req.constraint.allowed if req.constraint is not None else None
    if allowed is not None:
        unknown = [n for n in allowed if n not in known]
        if len(unknown) == len(allowed):
            raise ServiceFault(
                400,
                "bad_placement",
                f"task {req.task_key} may run only on {_names(allowed)}, which the inventory does not "
                f"have (its nodes: {_names(list(known))})",
                allowed=allowed,
                nodes=list(known),
            )
    pool = {n: list(devs) for n, devs in free.items() if n not in down and (allowed is None or n in allowed)}
    rank = {n: i for i, n in enumerate(allowed or [])}
    placed = Counter(req.placed)
    if req.one_node and placed:
        pool = {n: devs for n, devs in pool.items() if n in placed}
    chosen: list[list[DeviceInfo]] = []
    for _ in range(req.count):
        fits = [n for n, devs in pool.items() if len(devs) >= req.per_executor]
        if not fits:
            raise _unsatisfiable(free, known, down, req, allowed, len(chosen))
        best = min(
            fits,
            key=lambda n: (placed[n], rank.get(n, 0), n not in req.affinity, -len(pool[n]), n),
        )
        chosen.append(pool[best][: req.per_executor])
        pool[best] = pool[best][req.per_executor :]
        placed[best] += 1
        if req.one_node:
            pool = {best: pool[best]}
    return chosen


def _unsatisfiable(
    free: Mapping[str, Sequence[DeviceInfo]],
    known: Mapping[str, int],
    down: frozenset[str],
    req: PlacementRequest,
    allowed: list[str] | None,
    done: int,
) -> ServiceFault:
    """A 503 that says how many devices were wanted and free, and per node why none fits."""
    considered = allowed if allowed is not None else list(known)
    reasons = []
    for n in considered:
        if n not in known:
            reasons.append(f"{n}: unknown")
        elif n in down:
            reasons.append(f"{n}: down")
        else:
            reasons.append(f"{n}: {len(free.get(n, ()))} of {known[n]} free")
    where = f"on {_names(allowed)}" if allowed is not None else "on any node"
    needed = req.per_executor * req.count
    total = sum(known.get(n, 0) for n in considered)
    total_free = sum(len(free.get(n, ())) for n in considered if n not in down)
    return ServiceFault(
        503,
        "insufficient_devices",
        f"task {req.task_key} needs {needed} device(s) but only {total_free} of {total} are free "
        f"({req.count} executor(s) of {req.per_executor}, each on one node, {where}; "
        f"{done} placed; nodes: {'; '.join(reasons) or 'none'})",
        needed=needed,
        free=total_free,
        total=total,
    )


def _names(nodes: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in nodes) or "none"
