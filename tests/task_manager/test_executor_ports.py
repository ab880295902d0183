"""An executor's HTTP port and its invocation channel port are never the same port.

The task manager once drew them with two `free_port()` calls: each probe socket was closed before
the next bind, and the kernel may hand a just-released port to the next bind to port 0, so both
could be the same port and the executor's channel was then silently dropped. The kernel does that
rarely and at random; `LowestFreePortKernel` does it every time (it hands out the lowest port no
open socket holds, a choice the kernel is free to make), so the old draw fails here deterministically.
"""

from __future__ import annotations

import socket
import types
from pathlib import Path
from typing import Any, Self

import pytest
from tests.support.tasklib_tensor_math import MakeMatrix, MakeMatrixExecutor

from cornserve.runtime import process
from cornserve.runtime.process import free_ports
from cornserve.task import ExecutorLaunchSpec, ExecutorPlacement, UnitTask
from cornserve.task_manager.executor import ExecutorStartError, ManagedExecutor

FIRST_PORT = 40000


class LowestFreePortKernel:
    """Stands in for the `socket` module of `cornserve.runtime.process`: binds to port 0 get the
    lowest port that no open socket of this model holds (so a closed socket's port comes back)."""

    AF_INET = socket.AF_INET
    SOCK_STREAM = socket.SOCK_STREAM

    def __init__(self) -> None:
        self.held: set[int] = set()

    def socket(self, family: int, kind: int) -> ModelSocket:
        """A socket of this model."""
        return ModelSocket(self)


class ModelSocket:
    """The part of a socket `free_ports` uses: bind to port 0, getsockname, close as a context."""

    def __init__(self, kernel: LowestFreePortKernel) -> None:
        self.kernel = kernel
        self.port: int | None = None

    def bind(self, address: tuple[str, int]) -> None:
        assert address[1] == 0, address
        port = FIRST_PORT
        while port in self.kernel.held:
            port += 1
        self.kernel.held.add(port)
        self.port = port

    def getsockname(self) -> tuple[str, int]:
        assert self.port is not None
        return ("127.0.0.1", self.port)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.port is not None:
            self.kernel.held.discard(self.port)
            self.port = None


class PlacementSeen(Exception):
    """Raised by the patched `launch_spec` to stop the launch once the placement is known."""

    def __init__(self, placement: ExecutorPlacement) -> None:
        super().__init__(placement.executor_id)
        self.placement = placement


def launch_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ExecutorPlacement:
    """The placement `ManagedExecutor.launch` hands to the descriptor (the process is never started)."""

    def capture(self: Any, task: UnitTask[Any, Any], placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        raise PlacementSeen(placement)

    monkeypatch.setattr(MakeMatrixExecutor, "launch_spec", capture)
    task = MakeMatrix(descriptor=MakeMatrixExecutor())
    ex = ManagedExecutor(executor_id="ex-ports", devices=[], log_path=tmp_path / "ex.log")
    with pytest.raises(ExecutorStartError) as raised:
        ex.launch(task, "nats://127.0.0.1:4222")
    seen = raised.value.__cause__
    assert isinstance(seen, PlacementSeen), raised.value
    return seen.placement


def test_the_channel_port_differs_from_the_http_port_when_the_kernel_reuses_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = LowestFreePortKernel()
    monkeypatch.setattr(process, "socket", types.SimpleNamespace(**{
        "AF_INET": kernel.AF_INET, "SOCK_STREAM": kernel.SOCK_STREAM, "socket": kernel.socket,
    }))  # fmt: skip
    placement = launch_placement(tmp_path, monkeypatch)
    assert placement.channel_port is not None, placement
    assert placement.channel_port != placement.port, placement
    assert kernel.held == set()  # every probe socket was closed


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_refuses_a_count_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        free_ports(0)
