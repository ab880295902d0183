"""What every GPU path shares: is CuPy/CUDA usable, which device and stream, waiting on events.

Nothing here imports CuPy eagerly, so CPU-only machines never need CuPy or a driver; a CUDA tensor
on such a machine raises :class:`~cornserve.sidecar.errors.GpuUnavailable` saying what is missing.
The transports live in :mod:`cornserve.sidecar.gpu_ipc` (CUDA IPC, same node) and
:mod:`cornserve.sidecar.gpu_nccl` (NCCL, across nodes).

Streams: the producer's kernels run on *its* current stream, on *its* thread. The client's
coroutines run on the client's loop thread (a private thread for the ``*_sync`` API), whose
current stream is a different one; so :func:`capture` records an event on the caller's stream on
the caller's thread, and the transport makes its own stream wait on that event.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from cornserve.sidecar.errors import GpuUnavailable, SidecarTimeout, UnsupportedData

MIN_CUPY_MAJOR = 14
"""CuPy 14 changed NCCL unique ids from tuples of ints to ``bytes``; only that form is supported."""


def cupy_problem() -> str | None:
    """Why CuPy cannot be used here (None when it can); does not touch the driver."""
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); install cornserve-sidecar[gpu]"
    major = _major(getattr(cupy, "__version__", "0"))
    if major < MIN_CUPY_MAJOR:
        return f"CuPy {cupy.__version__} is too old: the GPU paths need CuPy >= {MIN_CUPY_MAJOR}"
    return None


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


@functools.cache
def gpu_problem() -> str | None:
    """Why the GPU paths cannot run in this process (None when CuPy and a CUDA device are there)."""
    problem = cupy_problem()
    if problem is not None:
        return problem
    from cupy.cuda import runtime

    try:
        count = int(runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError without a driver; its type lives in CuPy
        return f"no usable CUDA driver: {exc}"
    return None if count > 0 else "no CUDA device is visible"


def gpu_available() -> bool:
    """CuPy >= 14 importable and at least one CUDA device visible."""
    return gpu_problem() is None


def require_gpu() -> None:
    """Raise :class:`GpuUnavailable` naming what is missing when a GPU path is used without it."""
    problem = gpu_problem()
    if problem is not None:
        raise GpuUnavailable(f"CUDA tensors cannot be sent or received here: {problem}")


# ---------------------------------------------------------------------- PyTorch allocator settings


def allocator_ipc_problem(settings: str, backend: str) -> str | None:
    """Why memory from PyTorch's allocator cannot be exported with ``cudaIpcGetMemHandle``.

    ``settings`` is the allocator configuration string (``PYTORCH_ALLOC_CONF`` syntax,
    ``key:value`` pairs separated by commas), ``backend`` the name
    ``torch.cuda.get_allocator_backend()`` reports. Expandable segments map memory with the
    ``cuMem*`` virtual memory API and cudaMallocAsync allocates from a stream-ordered pool:
    ``cudaIpcGetMemHandle`` refuses both kinds of memory.
    """
    options: dict[str, str] = {}
    for part in settings.split(","):
        key, sep, value = part.partition(":")
        if sep:
            options[key.strip().lower()] = value.strip()
    if options.get("expandable_segments", "").lower() == "true":
        return "PyTorch's allocator uses expandable segments (expandable_segments:True)"
    if backend == "cudaMallocAsync" or options.get("backend") == "cudaMallocAsync":
        return "PyTorch's allocator backend is cudaMallocAsync"
    return None


def allocator_settings() -> str:
    """The allocator configuration from the environment, where PyTorch reads it at start.

    PyTorch has no public getter for the settings in effect; only its private
    ``_set_allocator_settings`` changes them later, which nothing in Cornserve calls.
    """
    parts = [os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")]
    return ",".join(p for p in parts if p)


def check_ipc_allocator() -> None:
    """Raise :class:`GpuUnavailable` when PyTorch's CUDA memory cannot carry an IPC handle."""
    problem = allocator_ipc_problem(allocator_settings(), torch.cuda.get_allocator_backend())
    if problem is not None:
        raise GpuUnavailable(
            f"{problem}: cudaIpcGetMemHandle cannot export its memory, so CUDA tensors cannot go "
            "through the sidecar; start the executor without it (unset expandable_segments / "
            "backend:cudaMallocAsync in PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF)"
        )


# ---------------------------------------------------------------------- devices and streams


def device_index(device: torch.device | int | str, current: int | None = None) -> int:
    """The CUDA device index ``device`` names (``cuda`` alone means ``current``, else 0)."""
    d = torch.device(f"cuda:{device}") if isinstance(device, int) else torch.device(device)
    if d.type != "cuda":
        raise GpuUnavailable(f"{d} is not a CUDA device")
    if d.index is not None:
        return d.index
    return current if current is not None else 0


def caller_device() -> int | None:
    """The calling thread's current CUDA device, when that thread has used CUDA (else None).

    Called on the caller's thread before the client hops to its loop thread, whose current
    device is its own (0 unless someone set it there).
    """
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # cheap: every recv asks
        return None
    return int(torch.cuda.current_device())


def receive_device(explicit: torch.device | int | str | None, captured: int | None) -> int:
    """Where a GPU chunk received over NCCL lands: the ``device`` argument, else the caller's device."""
    if explicit is not None:
        return device_index(explicit, captured)
    return captured if captured is not None else 0


@dataclass(frozen=True)
class ProducerReady:
    """A CUDA tensor to send and an event marking where its producer's stream was at ``send``."""

    tensor: torch.Tensor
    device: int
    event: torch.cuda.Event


def capture(tensor: torch.Tensor) -> ProducerReady:
    """Record the caller's current stream of the tensor's device (call on the caller's thread)."""
    require_gpu()
    if tensor.numel() == 0:
        raise UnsupportedData("a CUDA tensor with no elements has no memory to export; send tensor.cpu()")
    device = device_index(tensor.device)
    event = new_event()
    event.record(torch.cuda.current_stream(device))
    return ProducerReady(tensor.detach(), device, event)


_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: int) -> torch.cuda.Stream:
    """The process's transfer stream on ``device`` (never the legacy default stream)."""
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = new_stream(device)
    return stream


def new_stream(device: int) -> torch.cuda.Stream:
    """A new CUDA stream on ``device`` (typed wrapper: torch's constructor is untyped)."""
    return torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]


def new_event() -> torch.cuda.Event:
    """A new CUDA event (typed wrapper: torch's constructor is untyped)."""
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


POLL_MIN_S = 0.00005
POLL_MAX_S = 0.002


class Pollable(Protocol):
    """Something whose completion can be asked without blocking (a ``torch.cuda.Event``)."""

    def query(self) -> bool:
        """True once the work recorded before it finished."""
        ...


async def wait_event(event: Pollable, deadline: float, what: str) -> None:
    """Wait until ``event`` completed, polling so the loop stays free; :class:`SidecarTimeout` at ``deadline``.

    ``deadline`` is a ``time.monotonic()`` value. Polling (not ``event.synchronize()`` in a thread)
    keeps the wait cancellable and bounded.
    """
    pause = POLL_MIN_S
    while not event.query():
        if time.monotonic() >= deadline:
            raise SidecarTimeout(f"{what}: the GPU work did not finish before the deadline")
        await asyncio.sleep(pause)
        pause = min(pause * 2, POLL_MAX_S)
