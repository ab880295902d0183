"""The GPU transports' logic that runs without CUDA: ids, validation, allocator checks, devices,
handle bookkeeping, abort-on-timeout; and the typed error a machine without CuPy/CUDA gives.

Fakes stand in only for CuPy objects this machine cannot have (a communicator, CuPy itself);
everything else is the real code. The CUDA paths themselves are in test_gpu.py (marker `gpu`).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from cornserve.bus.sidecar import DataMeta, Location, NcclPullRequest
from cornserve.sidecar import Sidecar, gpu, gpu_ipc, gpu_nccl
from cornserve.sidecar.errors import (
    BadRequest,
    GpuTransferFailed,
    GpuUnavailable,
    SidecarTimeout,
    UnsupportedData,
)

no_gpu = pytest.mark.skipif(gpu.gpu_available(), reason="checks the error of a machine without CuPy/CUDA")

UID = bytes(range(128))


# ---------------------------------------------------------------------- NCCL unique ids


def test_unique_id_is_128_bytes_and_travels_as_hex() -> None:
    wire = gpu_nccl.uid_to_wire(UID)
    assert wire == UID.hex() and len(wire) == 256
    assert gpu_nccl.uid_from_wire(wire) == UID
    assert NcclPullRequest(id="x", chunk_id=0, dst_rank=1, nccl_uid=wire).nccl_uid == wire


def test_unique_id_of_old_cupy_or_wrong_size_is_refused() -> None:
    old_form = tuple(b - 256 if b > 127 else b for b in UID)  # CuPy < 14: a tuple of signed chars
    with pytest.raises(GpuUnavailable, match="not bytes"):
        gpu_nccl.check_unique_id(old_form)
    with pytest.raises(GpuUnavailable, match="127 bytes"):
        gpu_nccl.check_unique_id(UID[:-1])


@pytest.mark.parametrize(
    "value",
    [UID.hex()[:-2], UID.hex() + "00", UID.hex().upper(), "zz" * 128, 12, None, list(UID)],
)
def test_unique_id_from_the_bus_is_validated(value: Any) -> None:
    with pytest.raises(BadRequest):
        gpu_nccl.uid_from_wire(value)
    if isinstance(value, str):
        with pytest.raises(ValidationError):
            NcclPullRequest(id="x", chunk_id=0, dst_rank=1, nccl_uid=value)


# ---------------------------------------------------------------------- no CuPy / no CUDA


@no_gpu
def test_no_cupy_or_no_device_is_a_typed_error_not_a_crash() -> None:
    problem = gpu.gpu_problem()
    assert problem is not None and ("CuPy" in problem or "CUDA" in problem)
    with pytest.raises(GpuUnavailable, match="CUDA tensors cannot be sent or received here") as info:
        gpu.require_gpu()
    assert isinstance(info.value, UnsupportedData)  # callers catching the old error still do
    with pytest.raises(GpuUnavailable):
        asyncio.run(gpu_nccl.open_link(UID, 2, 0, 0, time.monotonic() + 1))


def test_cupy_older_than_14_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__="13.6.0"))
    assert "too old" in (gpu.cupy_problem() or "")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__="14.2.0"))
    assert gpu.cupy_problem() is None


@no_gpu
async def test_receiving_a_cuda_chunk_without_cupy_raises_gpu_unavailable(
    sidecars: Any, env_nats: str
) -> None:
    """A real server hands a consumer a CUDA IPC location; without CuPy/CUDA the consumer gets the typed error."""
    (a,) = await sidecars(1)
    async with Sidecar(a.rank) as sc:
        nc = sc._nc
        assert nc is not None and sc._info is not None
        from cornserve.bus.micro import request
        from cornserve.bus.sidecar import SendRequest, SidecarAck
        from cornserve.bus.subjects import SidecarVerb, sidecar_subject

        loc = Location(
            transport="cuda_ipc",
            offset=256,
            size=16,
            meta=DataMeta(kind="cuda", dtype="float32", shape=[4], nbytes=16),
            cuda_handle="ab" * 64,
            node=sc._info.node,
        )
        msg = SendRequest(
            id="g",
            chunk_id=0,
            num_chunks=1,
            dst_ranks=[[a.rank]],
            instance=sc._info.instance,
            location=loc,
            timeout=5,
        )
        await request(nc, sidecar_subject(a.rank, SidecarVerb.SEND), msg, SidecarAck, 10)
        with pytest.raises(GpuUnavailable):
            await sc.recv("g", timeout=5)
        await sc.mark_done("g")


# ---------------------------------------------------------------------- PyTorch allocator settings


@pytest.mark.parametrize(
    ("settings", "backend", "blocked"),
    [
        ("", "native", None),
        ("max_split_size_mb:128,garbage_collection_threshold:0.8", "native", None),
        ("expandable_segments:True", "native", "expandable segments"),
        ("max_split_size_mb:64, expandable_segments:true", "native", "expandable segments"),
        ("expandable_segments:False", "native", None),
        ("backend:cudaMallocAsync", "native", "cudaMallocAsync"),
        ("", "cudaMallocAsync", "cudaMallocAsync"),
    ],
)
def test_allocator_settings_that_forbid_ipc_handles(settings: str, backend: str, blocked: str | None) -> None:
    problem = gpu.allocator_ipc_problem(settings, backend)
    assert (problem is None) if blocked is None else (blocked in (problem or ""))


def test_expandable_segments_detected_from_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert "expandable_segments:True" in gpu.allocator_settings()
    with pytest.raises(GpuUnavailable, match=r"expandable segments.*PYTORCH_ALLOC_CONF"):
        gpu.check_ipc_allocator()
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(GpuUnavailable):
        gpu.check_ipc_allocator()
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    gpu.check_ipc_allocator()


# ---------------------------------------------------------------------- devices


def test_device_selection() -> None:
    assert gpu.device_index(torch.device("cuda:3")) == 3
    assert gpu.device_index("cuda", current=2) == 2
    assert gpu.device_index("cuda") == 0
    assert gpu.device_index(1) == 1
    with pytest.raises(GpuUnavailable):
        gpu.device_index("cpu")
    # NCCL receives land on the explicit device, else the caller's captured one, else 0.
    assert gpu.receive_device("cuda:1", captured=0) == 1
    assert gpu.receive_device(None, captured=2) == 2
    assert gpu.receive_device(None, captured=None) == 0
    assert gpu.receive_device("cuda", captured=3) == 3


@no_gpu
def test_caller_device_without_cuda_is_none() -> None:
    assert gpu.caller_device() is None


async def test_recv_captures_the_device_on_the_callers_thread(
    sidecars: Any, env_nats: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recv_sync` runs on the client's loop thread; the caller's device must be read before the hop."""
    (a,) = await sidecars(1)
    seen: list[threading.Thread] = []
    monkeypatch.setattr(gpu, "caller_device", lambda: seen.append(threading.current_thread()) or None)

    def consumer() -> Any:
        sc = Sidecar(a.rank).connect_sync()
        try:
            sc.send_sync({"v": 1}, "dev", [[a.rank]])
            got = sc.recv_sync("dev", timeout=10)
            sc.mark_done_sync("dev")
            return got, threading.current_thread()
        finally:
            sc.close_sync()

    got, thread = await asyncio.to_thread(consumer)
    assert got == {"v": 1}
    assert seen == [thread]


# ---------------------------------------------------------------------- CUDA IPC bookkeeping


def test_handle_offset_inside_the_allocation() -> None:
    assert gpu_ipc.offset_in_allocation(0x1000 + 512, 256, 0x1000, 2 << 20) == 512
    assert gpu_ipc.offset_in_allocation(0x1000, 2 << 20, 0x1000, 2 << 20) == 0
    with pytest.raises(GpuUnavailable):
        gpu_ipc.offset_in_allocation(0x1000 + 512, 2 << 20, 0x1000, 2 << 20)  # runs past the end
    with pytest.raises(GpuUnavailable):
        gpu_ipc.offset_in_allocation(0x800, 16, 0x1000, 2 << 20)  # before the base


def test_local_exports_are_counted_per_handle_and_offset() -> None:
    exports = gpu_ipc.LocalExports()
    first, second = torch.zeros(4), torch.ones(4)
    a = gpu_ipc.IpcExport("ab" * 64, 0, 0)
    b = gpu_ipc.IpcExport("ab" * 64, 512, 0)  # same allocation, another buffer in it
    exports.add(a, first)
    exports.add(a, first)  # the same staged buffer held for two chunks
    exports.add(b, second)
    assert exports.get(a.handle, 0) is first and exports.get(b.handle, 512) is second
    exports.remove(a.handle, 0)
    assert exports.get(a.handle, 0) is first
    exports.remove(a.handle, 0)
    assert exports.get(a.handle, 0) is None and len(exports) == 1
    exports.remove(a.handle, 0)  # unknown: ignored
    exports.remove(b.handle, 512)
    assert len(exports) == 0


def _loc(**update: Any) -> Location:
    base = Location(
        transport="cuda_ipc",
        offset=512,
        size=16,
        meta=DataMeta(kind="cuda", dtype="float32", shape=[2, 2], nbytes=16),
        cuda_handle="0f" * 64,
    )
    return base.model_copy(update=update)


def test_ipc_location_from_the_bus_is_validated() -> None:
    assert gpu_ipc.check_location(_loc()) == bytes.fromhex("0f" * 64)
    with pytest.raises(BadRequest, match="hex"):
        gpu_ipc.check_location(_loc(cuda_handle="0f" * 63))
    with pytest.raises(BadRequest, match="not 20 bytes"):
        gpu_ipc.check_location(_loc(meta=DataMeta(kind="cuda", dtype="float32", shape=[2, 2], nbytes=20)))
    with pytest.raises(ValidationError):
        Location(transport="cuda_ipc", meta=DataMeta(kind="cuda", nbytes=0), cuda_handle="XYZ")


def test_a_consumer_in_the_exporting_process_gets_the_staged_buffer() -> None:
    """CUDA refuses to open a process's own handle: the local registry answers instead (no CuPy call)."""
    staged = torch.arange(4, dtype=torch.float32).view(2, 2)
    loc = _loc(cuda_handle="1e" * 64)
    exp = gpu_ipc.IpcExport(loc.cuda_handle, loc.offset, 0)
    gpu_ipc.LOCAL_EXPORTS.add(exp, staged)
    try:
        assert gpu_ipc.IpcMappings().view(("g", 0), loc, 0) is staged
    finally:
        gpu_ipc.LOCAL_EXPORTS.remove(exp.handle, exp.offset)


def test_open_handles_are_shared_in_the_process_and_closed_with_the_last_user() -> None:
    """Two clients (or two chunks of one allocation) in one process share one mapping of a handle."""
    opened: list[tuple[bytes, int]] = []
    closed: list[int] = []

    def open_handle(raw: bytes, device: int) -> int:
        opened.append((raw, device))
        return 0x7000_0000 + 0x1000 * len(opened)

    handles = gpu_ipc.OpenHandles(open_handle, closed.append)
    raw = bytes.fromhex("2d" * 64)
    first = handles.acquire("2d" * 64, raw, 1)
    second = handles.acquire("2d" * 64, raw, 1)
    assert first == second and opened == [(raw, 1)] and handles.users("2d" * 64) == 2
    handles.release("2d" * 64)
    assert closed == []
    handles.release("2d" * 64)
    assert closed == [first] and handles.users("2d" * 64) == 0
    assert handles.acquire("2d" * 64, raw, 0) != first  # mapped afresh after the last close


def test_a_failed_wrap_releases_the_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[int] = []
    handles = gpu_ipc.OpenHandles(lambda raw, device: 0x9000, closed.append)
    mappings = gpu_ipc.IpcMappings(handles)

    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("CuPy could not wrap the memory")

    monkeypatch.setattr(gpu_ipc.IpcMappings, "_wrap", staticmethod(broken))
    with pytest.raises(RuntimeError):
        mappings.view(("g", 0), _loc(), 0)
    assert closed == [0x9000] and handles.users(_loc().cuda_handle) == 0
    mappings.close(("g", 0))  # nothing was recorded: no second release


# ---------------------------------------------------------------------- NCCL abort-on-timeout


class FakeComm:
    """Stands in for cupy's NcclCommunicator (needs NCCL and a GPU)."""

    def __init__(self) -> None:
        self.aborts = 0

    def abort(self) -> None:
        self.aborts += 1

    def check_async_error(self) -> None:
        pass


class Done:
    def __init__(self, after: float) -> None:
        self.at = time.monotonic() + after

    def query(self) -> bool:
        return time.monotonic() >= self.at


def _link() -> gpu_nccl.NcclLink:
    return gpu_nccl.NcclLink(comm=FakeComm(), device=0, stream=None)


async def test_a_finished_operation_keeps_the_link() -> None:
    link = _link()
    await gpu_nccl.bounded(link, lambda: Done(0.01), time.monotonic() + 5, "op")
    assert not link.aborted and link.comm.aborts == 0


async def test_an_operation_past_its_deadline_aborts_the_link() -> None:
    link = _link()
    with pytest.raises(SidecarTimeout):
        await gpu_nccl.bounded(link, lambda: Done(60), time.monotonic() + 0.1, "recv")
    assert link.aborted and link.comm.aborts == 1
    with pytest.raises(GpuTransferFailed, match="aborted"):  # never reused
        await gpu_nccl.bounded(link, lambda: Done(0), time.monotonic() + 5, "recv")


async def test_an_enqueue_that_blocks_past_the_deadline_aborts_the_link() -> None:
    release = threading.Event()
    link = _link()

    def stuck() -> gpu.Pollable:
        release.wait(10)  # as ncclSend waiting for a peer that never connects
        return Done(0)

    try:
        with pytest.raises(SidecarTimeout):
            await gpu_nccl.bounded(link, stuck, time.monotonic() + 0.1, "send")
        assert link.aborted
    finally:
        release.set()


async def test_a_failing_operation_aborts_and_raises_the_typed_error() -> None:
    link = _link()

    def fails() -> gpu.Pollable:
        raise RuntimeError("NCCL error: invalid usage (run with NCCL_DEBUG=WARN for details)")

    with pytest.raises(GpuTransferFailed, match="Duplicate GPU detected"):
        await gpu_nccl.bounded(link, fails, time.monotonic() + 5, "send")
    assert link.aborted


def test_links_per_peer_and_direction_are_aborted_when_replaced_or_discarded() -> None:
    links = gpu_nccl.NcclLinks()
    send, recv = _link(), _link()
    links.put(7, "send", send)
    links.put(7, "recv", recv)
    assert links.get(7, "send") is send and links.get(7, "recv") is recv  # two directions, two links
    newer = _link()
    links.put(7, "send", newer)
    assert send.aborted and links.get(7, "send") is newer
    links.discard(7, "recv")
    assert recv.aborted and links.get(7, "recv") is None
    newer.abort()
    assert links.get(7, "send") is None  # an aborted link is forgotten
    last = _link()
    links.put(8, "recv", last)
    links.close()
    assert last.aborted


@pytest.fixture
def slow_nccl(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[FakeComm]]]:
    """A stand-in CuPy whose NcclCommunicator blocks until released (ncclCommInitRank waiting for its peer)."""
    proceed = threading.Event()
    made: list[FakeComm] = []

    class SlowCommunicator(FakeComm):
        def __init__(self, ndev: int, uid: bytes, rank: int) -> None:
            super().__init__()
            assert isinstance(uid, bytes) and len(uid) == 128 and (ndev, rank) == (2, 1)
            made.append(self)
            proceed.wait(10)

    class Device:
        def __init__(self, index: int) -> None:
            pass

        def __enter__(self) -> None:
            pass

        def __exit__(self, *exc: object) -> None:
            pass

    nccl = types.SimpleNamespace(NcclCommunicator=SlowCommunicator)
    cuda = types.SimpleNamespace(Device=Device, nccl=nccl)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__="14.2.0", cuda=cuda))
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    monkeypatch.setattr(gpu, "require_gpu", lambda: None)
    yield proceed, made
    proceed.set()


async def _aborted(made: list[FakeComm]) -> bool:
    deadline = time.monotonic() + 10
    while not (made and made[0].aborts) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return bool(made) and made[0].aborts == 1


async def test_a_communicator_that_completes_after_its_timeout_is_aborted(
    slow_nccl: tuple[threading.Event, list[FakeComm]],
) -> None:
    """ncclCommInitRank cannot be interrupted: a late success must not leave a usable communicator."""
    proceed, made = slow_nccl
    with pytest.raises(SidecarTimeout):
        await gpu_nccl.open_link(UID, 2, 1, 0, time.monotonic() + 0.1)
    proceed.set()
    assert await _aborted(made)


async def test_cancelling_a_communicator_set_up_propagates_and_aborts_it_later(
    slow_nccl: tuple[threading.Event, list[FakeComm]],
) -> None:
    proceed, made = slow_nccl
    task = asyncio.create_task(gpu_nccl.open_link(UID, 2, 1, 0, time.monotonic() + 30))
    while not made:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # a cancellation is not turned into a timeout
        await task
    proceed.set()
    assert await _aborted(made)
