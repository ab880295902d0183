"""The device inventory: GPUs when present, otherwise CPU slots; device i is served by sidecar rank i."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Literal

from cornserve.bus.control import DeviceInfo
from cornserve.bus.micro import ServiceFault

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

    def snapshot(self) -> list[DeviceInfo]:
        """Every device, with `task_key` set for used ones."""
        return [d.model_copy(update={"task_key": self._owner.get(_ident(d))}) for d in self._devices]

    def free_count(self) -> int:
        """How many devices are unused."""
        return sum(1 for d in self._devices if _ident(d) not in self._owner)

    def allocate(self, task_key: str, count: int) -> list[DeviceInfo]:
        """`count` free devices for `task_key`, lowest index first; a typed 503 if there are not enough."""
        free = [d for d in self._devices if _ident(d) not in self._owner]
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
        """Mark recovered devices as used by `task_key`; returns those that are unknown or taken."""
        known = {_ident(d) for d in self._devices}
        conflicts = []
        for d in devices:
            ident = _ident(d)
            holder = self._owner.get(ident)
            if ident not in known or (holder is not None and holder != task_key):
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
