"""The device inventory: every node's devices (kind, index, memory), and which deployment uses which.

With the local spawner it is this machine: GPUs when present, otherwise CPU slots, device i served
by sidecar rank i. Other spawner backends report their nodes' devices (`NodeSource`). A node can be
down (its engine unreachable, its sidecars stopped): its devices are then neither allocated nor
claimed, and deployments on it are re-placed by reconciliation.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from typing import Literal

from cornserve.bus.control import DeviceInfo
from cornserve.bus.micro import ServiceFault
from cornserve.resource_manager.placement import PlacementRequest, place

logger = logging.getLogger(__name__)

DeviceKind = Literal["auto", "cuda", "cpu"]


def count_gpus() -> int:
    """CUDA devices visible to this process; 0 without an NVIDIA driver (torch is only imported if one exists)."""
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")):
        return 0
    try:
        import torch
    except ImportError:
        logger.warning("an NVIDIA driver is present but torch is not importable; using CPU slots")
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def discover_devices(kind: DeviceKind, cpu_slots: int, node: str) -> list[DeviceInfo]:
    """Inventory of this node: every GPU (kind auto/cuda) or `cpu_slots` CPU slots."""
    gpus = count_gpus() if kind in ("auto", "cuda") else 0
    if kind == "cuda" and gpus == 0:
        raise RuntimeError("--device-kind cuda was requested but no CUDA device is visible")
    if gpus:
        return [DeviceInfo(kind="cuda", index=i, sidecar_rank=i, node=node) for i in range(gpus)]
    if cpu_slots < 1:
        raise RuntimeError(f"--cpu-slots must be at least 1, got {cpu_slots}")
    return [DeviceInfo(kind="cpu", index=i, sidecar_rank=i, node=node) for i in range(cpu_slots)]


def _ident(d: DeviceInfo) -> tuple[str, str, int]:
    return (d.node, d.kind, d.index)


class DeviceInventory:
    """Which deployment uses which device. Allocation is synchronous, so concurrent deploys never race."""

    def __init__(self, devices: Iterable[DeviceInfo]) -> None:
        self._devices = [d.model_copy(update={"task_key": None}) for d in devices]
        self._owner: dict[tuple[str, str, int], str] = {}
        self._down: frozenset[str] = frozenset()
        ranks = [d.sidecar_rank for d in self._devices]
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"two devices of the inventory share a sidecar rank: {sorted(ranks)}")
        idents = [_ident(d) for d in self._devices]
        if len(set(idents)) != len(idents):
            raise ValueError("two devices of the inventory have the same node, kind and index")

    @property
    def nodes(self) -> list[str]:
        """Every node of the inventory, in the order its devices were listed."""
        return list(dict.fromkeys(d.node for d in self._devices))

    @property
    def down(self) -> frozenset[str]:
        """Nodes known but unavailable now."""
        return self._down

    def set_down(self, nodes: Iterable[str]) -> tuple[set[str], set[str]]:
        """Mark exactly `nodes` as down (the others up); returns (newly down, newly up)."""
        down = frozenset(n for n in nodes if n in self.nodes)
        went_down, came_up = set(down - self._down), set(self._down - down)
        self._down = down
        return went_down, came_up

    def node_of(self, task_key: str) -> list[str]:
        """The nodes holding devices of `task_key` (empty when it holds none)."""
        return list(dict.fromkeys(ident[0] for ident, holder in self._owner.items() if holder == task_key))

    def snapshot(self) -> list[DeviceInfo]:
        """Every device, with `task_key` set for used ones."""
        return [d.model_copy(update={"task_key": self._owner.get(_ident(d))}) for d in self._devices]

    def free_count(self) -> int:
        """How many devices are unused."""
        return sum(1 for d in self._devices if _ident(d) not in self._owner)

    def free_by_node(self) -> dict[str, list[DeviceInfo]]:
        """The free devices of every node that is up, lowest index first."""
        free: dict[str, list[DeviceInfo]] = {}
        for d in sorted(self._devices, key=lambda d: (d.node, d.index)):
            if d.node not in self._down and _ident(d) not in self._owner:
                free.setdefault(d.node, []).append(d)
        return free

    def place(self, req: PlacementRequest) -> list[list[DeviceInfo]]:
        """Devices for `req.count` new executors by the placement rules (`placement`), now marked used."""
        sizes = Counter(d.node for d in self._devices)
        chosen = place(self.free_by_node(), {n: sizes[n] for n in self.nodes}, self._down, req)
        for devices in chosen:
            for d in devices:
                self._owner[_ident(d)] = req.task_key
        return [[d.model_copy(update={"task_key": req.task_key}) for d in devs] for devs in chosen]

    def allocate(self, task_key: str, count: int) -> list[DeviceInfo]:
        """`count` free devices for `task_key` on nodes that are up, lowest index first (any nodes).

        Kept for callers that need plain devices; deployments are placed with `place`.
        """
        free = [d for d in self._devices if _ident(d) not in self._owner and d.node not in self._down]
        if count > len(free):
            raise ServiceFault(
                503,
                "insufficient_devices",
                f"task {task_key} needs {count} device(s) but only {len(free)} of {len(self._devices)} are free",
                needed=count,
                free=len(free),
                total=len(self._devices),
            )
        chosen = free[:count]
        for d in chosen:
            self._owner[_ident(d)] = task_key
        return [d.model_copy(update={"task_key": task_key}) for d in chosen]

    def claim(self, task_key: str, devices: Iterable[DeviceInfo]) -> list[DeviceInfo]:
        """Mark recovered devices as used by `task_key`; returns those that are unknown, taken or down."""
        known = {_ident(d) for d in self._devices}
        conflicts = []
        for d in devices:
            ident = _ident(d)
            holder = self._owner.get(ident)
            if ident not in known or d.node in self._down or (holder is not None and holder != task_key):
                conflicts.append(d)
                continue
            self._owner[ident] = task_key
        return conflicts

    def release(self, task_key: str, devices: Iterable[DeviceInfo] | None = None) -> None:
        """Free `devices` (default: all) held by `task_key`."""
        idents = None if devices is None else {_ident(d) for d in devices}
        for ident, holder in list(self._owner.items()):
            if holder == task_key and (idents is None or ident in idents):
                del self._owner[ident]
