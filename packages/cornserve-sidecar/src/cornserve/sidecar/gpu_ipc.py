"""CUDA IPC between processes of one node: staging, handle export, opening, same-process delivery.

Staging: at ``send`` the producer's tensor is copied, on a side stream that first waits for the
producer's stream (:func:`cornserve.sidecar.gpu.capture`), into a fresh buffer that the client holds
until the producer's sidecar reports every destination done. We copy rather than keep the caller's
tensor alive because keeping it alive would not stop the producer from *writing* into it after
``send`` returns (reusing an output buffer is what engines do), and consumers would read the new
values; the copy costs one device memcpy (small next to the model work that made the tensor), and
makes ``send`` mean the same on GPUs as on CPUs: the value at ``send`` time is what arrives.

Export: PyTorch's caching allocator carves tensors out of larger ``cudaMalloc`` allocations and an
IPC handle always names a whole allocation, so the location carries the handle of the allocation
base (``cuMemGetAddressRange``) and the buffer's offset inside it.

A process may not open its own IPC handles (CUDA refuses), so every export is registered in a
process-wide :data:`LOCAL_EXPORTS`; a consumer in the exporting process (a send to one's own
rank, or two clients in one process) gets the staged tensor itself.
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.dlpack

from cornserve.bus.sidecar import Location
from cornserve.sidecar import gpu
from cornserve.sidecar.codec import torch_dtype
from cornserve.sidecar.errors import BadRequest, GpuUnavailable

IPC_HANDLE_BYTES = 64
"""``sizeof(cudaIpcMemHandle_t)``; on the wire as 128 lowercase hex digits."""
_HANDLE_HEX = re.compile(f"[0-9a-f]{{{2 * IPC_HANDLE_BYTES}}}")


@dataclass(frozen=True)
class IpcExport:
    """Where a staged buffer lives, as a consumer on the same node needs it."""

    handle: str
    """Hex of the IPC handle of the allocation holding the buffer."""
    offset: int
    """Byte offset of the buffer inside that allocation."""
    device: int


def offset_in_allocation(ptr: int, nbytes: int, base: int, size: int) -> int:
    """Byte offset of ``[ptr, ptr+nbytes)`` inside the allocation ``[base, base+size)``."""
    if not base <= ptr or ptr + nbytes > base + size:
        raise GpuUnavailable(
            f"buffer {ptr:#x}+{nbytes} is not inside its allocation {base:#x}+{size}; cannot export it"
        )
    return ptr - base


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def allocation_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the allocation containing device pointer ``ptr`` (``cuMemGetAddressRange``)."""
    base = ctypes.c_uint64()
    size = ctypes.c_size_t()
    rc = _libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise GpuUnavailable(f"cuMemGetAddressRange failed with CUresult {rc} for pointer {ptr:#x}")
    return int(base.value), int(size.value)


async def stage(ready: gpu.ProducerReady, deadline: float) -> torch.Tensor:
    """Copy the producer's tensor into a fresh contiguous buffer once its stream reached ``send``.

    Waits (bounded by ``deadline``) for the copy to finish: consumers in other processes read the
    buffer on their own streams, with no CUDA dependency on ours.
    """
    src = ready.tensor
    stream = gpu.side_stream(ready.device)
    with torch.cuda.device(ready.device), torch.cuda.stream(stream):
        stream.wait_event(ready.event)
        staged = torch.empty(src.shape, dtype=src.dtype, device=f"cuda:{ready.device}")
        staged.copy_(src)
        src.record_stream(stream)  # the caller may free its tensor at once: not reused before the copy
        done = gpu.new_event()
        done.record(stream)
    await gpu.wait_event(done, deadline, "staging a CUDA tensor for send")
    return staged


def export(staged: torch.Tensor) -> IpcExport:
    """Export ``staged`` (a contiguous CUDA tensor) as allocation handle + offset and register it."""
    from cupy.cuda import runtime

    gpu.check_ipc_allocator()
    device = gpu.device_index(staged.device)
    nbytes = staged.numel() * staged.element_size()
    with torch.cuda.device(device):
        ptr = staged.data_ptr()
        base, size = allocation_range(ptr)
        handle = bytes(runtime.ipcGetMemHandle(base))
    if len(handle) != IPC_HANDLE_BYTES:
        raise GpuUnavailable(f"CuPy returned a {len(handle)}-byte IPC handle, not {IPC_HANDLE_BYTES}")
    found = IpcExport(handle.hex(), offset_in_allocation(ptr, nbytes, base, size), device)
    LOCAL_EXPORTS.add(found, staged)
    return found


class LocalExports:
    """Buffers this process exported, by (handle, offset): what a consumer in this process gets.

    Process-wide (not per client) because two clients in one process are one CUDA context.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # clients own different loops, possibly on different threads
        self._by_key: dict[tuple[str, int], tuple[torch.Tensor, int]] = {}

    def add(self, exp: IpcExport, tensor: torch.Tensor) -> None:
        """Register one more holder of the buffer at ``exp`` (one per sent chunk)."""
        key = (exp.handle, exp.offset)
        with self._lock:
            _, users = self._by_key.get(key, (tensor, 0))
            self._by_key[key] = (tensor, users + 1)

    def remove(self, handle: str, offset: int) -> None:
        """Drop one holder; forget the buffer after its last."""
        key = (handle, offset)
        with self._lock:
            found = self._by_key.get(key)
            if found is None:
                return
            if found[1] <= 1:
                del self._by_key[key]
            else:
                self._by_key[key] = (found[0], found[1] - 1)

    def get(self, handle: str, offset: int) -> torch.Tensor | None:
        """The buffer exported at (``handle``, ``offset``) by this process, if it still holds it."""
        with self._lock:
            found = self._by_key.get((handle, offset))
        return None if found is None else found[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)


LOCAL_EXPORTS = LocalExports()


def check_location(loc: Location) -> bytes:
    """Validate a ``cuda_ipc`` location from the bus; return the raw handle."""
    if not isinstance(loc.cuda_handle, str) or not _HANDLE_HEX.fullmatch(loc.cuda_handle):
        raise BadRequest(f"CUDA IPC handle must be {2 * IPC_HANDLE_BYTES} lowercase hex digits")
    if loc.offset < 0 or loc.device < 0 or loc.meta.nbytes < 0:
        raise BadRequest("CUDA IPC location with a negative offset, device or size")
    numel = 1
    for d in loc.meta.shape:
        numel *= d
    if numel * torch.empty((), dtype=torch_dtype(loc.meta.dtype)).element_size() != loc.meta.nbytes:
        raise BadRequest(
            f"CUDA IPC meta: shape {loc.meta.shape} of {loc.meta.dtype} is not {loc.meta.nbytes} bytes"
        )
    return bytes.fromhex(loc.cuda_handle)


def _shaped(raw: torch.Tensor, loc: Location) -> torch.Tensor:
    return raw.view(torch_dtype(loc.meta.dtype)).view(loc.meta.shape)


def _cupy_open(raw: bytes, device: int) -> int:
    import cupy
    from cupy.cuda import runtime

    with cupy.cuda.Device(device):
        return int(runtime.ipcOpenMemHandle(raw))


def _cupy_close(base: int) -> None:
    from cupy.cuda import runtime

    runtime.ipcCloseMemHandle(base)


class OpenHandles:
    """Producer allocations opened in this process, reference-counted per IPC handle.

    Process-wide, like :data:`LOCAL_EXPORTS`: CUDA maps a handle once per process, yet several
    chunks (PyTorch's caching allocator puts many buffers in one allocation) and several clients in
    one process can need it; the mapping is closed with its last user.
    """

    def __init__(
        self,
        open_handle: Callable[[bytes, int], int] = _cupy_open,
        close_handle: Callable[[int], None] = _cupy_close,
    ) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, tuple[int, int]] = {}  # handle -> (base pointer, users)
        self._open_handle = open_handle
        self._close_handle = close_handle

    def acquire(self, handle: str, raw: bytes, device: int) -> int:
        """The mapped base of ``handle`` (opening it in ``device``'s context on first use)."""
        with self._lock:
            base, users = self._open.get(handle, (0, 0))
            if users == 0:
                base = self._open_handle(raw, device)
            self._open[handle] = (base, users + 1)
            return base

    def release(self, handle: str) -> None:
        """One user fewer; unmap after the last."""
        with self._lock:
            base, users = self._open[handle]
            if users <= 1:
                del self._open[handle]
                self._close_handle(base)
            else:
                self._open[handle] = (base, users - 1)

    def users(self, handle: str) -> int:
        """How many chunks use the mapping of ``handle`` (0: not mapped)."""
        with self._lock:
            return self._open.get(handle, (0, 0))[1]


OPEN_HANDLES = OpenHandles()


class IpcMappings:
    """A client's views of chunks that live in other processes' GPU memory (see :class:`OpenHandles`)."""

    def __init__(self, handles: OpenHandles | None = None) -> None:
        self._handles = handles or OPEN_HANDLES
        self._chunks: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}

    def view(self, key: tuple[str, int], loc: Location, device: int) -> torch.Tensor:
        """The chunk's tensor.

        The staged buffer itself when this process exported it; else a view, at the location's
        offset, of the handle opened in ``device``'s context (the consumer's: ``loc.device`` is the
        producer's index, which names another GPU, or none, under another CUDA_VISIBLE_DEVICES;
        ``cudaIpcMemLazyEnablePeerAccess`` lets a peer GPU's memory be read).
        """
        raw = check_location(loc)
        local = LOCAL_EXPORTS.get(loc.cuda_handle, loc.offset)
        if local is not None:
            return local
        found = self._chunks.get(key)
        if found is not None and found[0] == loc.cuda_handle:
            return found[1]
        if found is not None:
            self.close(key)
        base = self._handles.acquire(loc.cuda_handle, raw, device)
        try:
            t = _shaped(self._wrap(base, loc, device), loc)
        except BaseException:
            self._handles.release(loc.cuda_handle)
            raise
        self._chunks[key] = (loc.cuda_handle, t)
        return t

    @staticmethod
    def _wrap(base: int, loc: Location, device: int) -> torch.Tensor:
        nbytes = loc.meta.nbytes
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}")
        import cupy

        with cupy.cuda.Device(device):
            mem = cupy.cuda.UnownedMemory(base, loc.offset + nbytes, owner=None, device_id=device)
            raw = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, loc.offset))
            return torch.utils.dlpack.from_dlpack(raw)

    def close(self, key: tuple[str, int]) -> None:
        """Drop a finished chunk's view; the mapping closes with its last user in the process."""
        found = self._chunks.pop(key, None)
        if found is not None:
            self._handles.release(found[0])
