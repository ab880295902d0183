"""GPU data paths via CuPy: CUDA IPC on one node, NCCL across nodes.

Written against CuPy's real APIs and guarded by :func:`gpu_available`; nothing here is imported
eagerly, so CPU-only machines never need CuPy or a driver.

Same node: the producer exports a CUDA IPC memory handle for its tensor's allocation; the
consumer opens it and wraps the device memory as a tensor (device to device, no host bounce).
The producer's client keeps the tensor alive until its sidecar reports every destination done.

Across nodes: :class:`NcclPairs` lazily creates a two-rank NCCL communicator per peer; the lower
rank makes the unique id and hands it to the other over NATS. Executors call ``send``/``recv`` on
the communicator with the same stream ordering on both sides.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import torch
import torch.utils.dlpack

from cornserve.bus.sidecar import Location
from cornserve.sidecar.codec import torch_dtype
from cornserve.sidecar.errors import UnsupportedData


@functools.cache
def gpu_available() -> bool:
    """CuPy importable and at least one CUDA device visible."""
    try:
        import cupy  # noqa: F401
        from cupy.cuda import runtime
    except ImportError:
        return False
    try:
        return bool(runtime.getDeviceCount() > 0)
    except Exception:  # CUDARuntimeError without a driver
        return False


def require_gpu() -> None:
    """Raise a clear error when a GPU path is used without CuPy/CUDA."""
    if not gpu_available():
        raise UnsupportedData("GPU tensors need CuPy (pip install cornserve-sidecar[gpu]) and a CUDA device")


def _allocation_base(ptr: int) -> int:
    """Start of the cudaMalloc allocation containing ``ptr`` (``cuMemGetAddressRange``).

    PyTorch's caching allocator carves tensors out of larger allocations, and an IPC handle always
    names a whole allocation, so the consumer needs the tensor's offset inside it.
    """
    import ctypes

    libcuda = ctypes.CDLL("libcuda.so.1")
    base = ctypes.c_uint64()
    size = ctypes.c_size_t()
    rc = libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise UnsupportedData(f"cuMemGetAddressRange failed with CUresult {rc} for pointer {ptr:#x}")
    return int(base.value)


def export_ipc_handle(tensor: torch.Tensor) -> tuple[str, int, int]:
    """(IPC handle hex, offset of the tensor inside that allocation, device index)."""
    from cupy.cuda import runtime

    device = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(device):
        ptr = tensor.data_ptr()
        base = _allocation_base(ptr)
        handle = runtime.ipcGetMemHandle(base)
    return bytes(handle).hex(), ptr - base, device


class IpcMappings:
    """Producer allocations opened in this process, reference-counted per IPC handle.

    CUDA lets a process open a given handle only once, yet several chunks can live in one producer
    allocation (PyTorch's caching allocator); so opens are shared and closed with the last chunk.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[int, int]] = {}  # handle -> (base pointer, users)
        self._chunks: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}

    def view(self, key: tuple[str, int], loc: Location) -> torch.Tensor:
        """Return the chunk's tensor on the producer's device, opening the handle if needed."""
        import cupy
        from cupy.cuda import runtime

        found = self._chunks.get(key)
        if found is not None and found[0] == loc.cuda_handle:
            return found[1]
        if found is not None:
            self.close(key)
        meta = loc.meta
        with cupy.cuda.Device(loc.device):
            base, users = self._open.get(loc.cuda_handle, (0, 0))
            if users == 0:
                base = runtime.ipcOpenMemHandle(bytes.fromhex(loc.cuda_handle))
            self._open[loc.cuda_handle] = (base, users + 1)
            mem = cupy.cuda.UnownedMemory(base, loc.offset + meta.nbytes, owner=None, device_id=loc.device)
            raw = cupy.ndarray(
                (meta.nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, loc.offset)
            )
            t = torch.utils.dlpack.from_dlpack(raw).view(torch_dtype(meta.dtype)).view(meta.shape)
        self._chunks[key] = (loc.cuda_handle, t)
        return t

    def close(self, key: tuple[str, int]) -> None:
        """Drop a finished chunk's view; unmap the allocation after its last chunk."""
        found = self._chunks.pop(key, None)
        if found is None:
            return  # not a GPU chunk (and CuPy may not even be installed)
        from cupy.cuda import runtime

        handle = found[0]
        base, users = self._open[handle]
        if users <= 1:
            del self._open[handle]
            runtime.ipcCloseMemHandle(base)
        else:
            self._open[handle] = (base, users - 1)


class NatsUidExchange:
    """Hands NCCL unique ids between two ranks over NATS (request/reply, retried until the peer listens)."""

    def __init__(self, nc: Any, rank: int) -> None:
        self.nc = nc
        self.rank = rank

    async def __call__(self, peer: int, uid: bytes | None, timeout: float = 60.0) -> Any:
        """Send ``uid`` to ``peer`` (lower rank) or wait for it from ``peer`` (higher rank)."""
        import nats.errors

        from cornserve.bus.subjects import sidecar_nccl_subject

        if uid is not None:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                try:
                    await self.nc.request(sidecar_nccl_subject(peer, self.rank), uid, timeout=5)
                    return None
                except nats.errors.NoRespondersError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.1)
        sub = await self.nc.subscribe(sidecar_nccl_subject(self.rank, peer), max_msgs=1)
        msg = await sub.next_msg(timeout=timeout)
        await msg.respond(b"ok")
        return _uid_from_bytes(msg.data)


def _uid_from_bytes(data: bytes) -> Any:
    """Rebuild the id object cupy.cuda.nccl expects (a tuple of 128 signed chars)."""
    return tuple(b - 256 if b > 127 else b for b in data)


class NcclPairs:
    """Lazily created pairwise NCCL communicators between this rank and its peers.

    ``exchange(peer, uid_or_none)`` is an async callable supplied by the owner that sends the
    unique id over NATS (lower rank) or waits for it (higher rank); this keeps the bus out of here.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._comms: dict[int, Any] = {}

    async def comm(self, peer: int, exchange: Any, timeout: float = 120.0) -> Any:
        """Return the communicator shared with ``peer``, created on first use."""
        require_gpu()
        from cupy.cuda import nccl

        found = self._comms.get(peer)
        if found is not None:
            return found
        if self.rank < peer:
            uid = nccl.get_unique_id()
            await exchange(peer, bytes(b & 0xFF for b in uid))
            my_index = 0
        else:
            uid = await exchange(peer, None)
            my_index = 1
        device = torch.cuda.current_device()

        def init() -> Any:
            import cupy

            # Blocks until the peer joins, so it runs off the event loop, on the caller's device.
            with cupy.cuda.Device(device):
                return nccl.NcclCommunicator(2, uid, my_index)

        comm = await asyncio.wait_for(asyncio.to_thread(init), timeout)
        self._comms[peer] = comm
        return comm

    def indices(self, peer: int) -> tuple[int, int]:
        """(my index, peer index) inside the two-rank communicator with ``peer``."""
        return (0, 1) if self.rank < peer else (1, 0)

    @staticmethod
    def send(comm: Any, tensor: torch.Tensor, peer_index: int) -> None:
        """Send a contiguous CUDA tensor's bytes to the other rank of ``comm`` on the current stream."""
        from cupy.cuda import nccl

        stream = torch.cuda.current_stream().cuda_stream
        nbytes = tensor.numel() * tensor.element_size()
        comm.send(tensor.data_ptr(), nbytes, nccl.NCCL_UINT8, peer_index, stream)

    @staticmethod
    def recv(comm: Any, out: torch.Tensor, peer_index: int) -> None:
        """Receive into a preallocated contiguous CUDA tensor from the other rank of ``comm``."""
        from cupy.cuda import nccl

        stream = torch.cuda.current_stream().cuda_stream
        nbytes = out.numel() * out.element_size()
        comm.recv(out.data_ptr(), nbytes, nccl.NCCL_UINT8, peer_index, stream)


def nccl_send_blocking(comm: Any, tensor: torch.Tensor, peer_index: int, device: int) -> None:
    """Send and wait for completion (run in a worker thread)."""
    with torch.cuda.device(device):
        NcclPairs.send(comm, tensor, peer_index)
        torch.cuda.current_stream().synchronize()


def nccl_recv_blocking(comm: Any, out: torch.Tensor, peer_index: int, device: int) -> None:
    """Receive and wait for completion (run in a worker thread)."""
    with torch.cuda.device(device):
        NcclPairs.recv(comm, out, peer_index)
        torch.cuda.current_stream().synchronize()
