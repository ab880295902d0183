"""Turn send-able values into raw bytes plus :class:`DataMeta`, and back.

Tensors are written as their contiguous bytes (one copy, or none when the tensor already lives in
the arena); the receiving side rebuilds a view over the mapped bytes without copying. Small
objects use pickle restricted to plain data (no classes or globals are ever loaded back), which is
both fast and safe against a malicious message naming arbitrary callables.
"""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Any

import numpy as np
import torch

from cornserve.bus.sidecar import DataMeta
from cornserve.sidecar.errors import UnsupportedData

_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)
MAX_OBJECT_DEPTH = 64


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > MAX_OBJECT_DEPTH:
        raise UnsupportedData("object nests deeper than 64 levels")
    if isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, list | tuple):
        for item in obj:
            _check_plain(item, depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise UnsupportedData(f"dict keys must be str or int, got {type(k).__name__}")
            _check_plain(v, depth + 1)
        return
    raise UnsupportedData(
        f"cannot send {type(obj).__name__}: send a torch tensor, a numpy array, or str/bytes/int/float/bool/"
        "None and dicts/lists of those"
    )


class _PlainUnpickler(pickle.Unpickler):
    """Refuses to resolve any global, so only plain containers and scalars can be rebuilt."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


class Encoded:
    """A value ready to be written: its metadata and a function that writes it into a buffer."""

    def __init__(self, meta: DataMeta, source: torch.Tensor | np.ndarray | bytes) -> None:
        self.meta = meta
        self.source = source

    @property
    def nbytes(self) -> int:
        """Bytes the value occupies in the arena."""
        return self.meta.nbytes

    def raw(self) -> memoryview:
        """The value's bytes as one flat byte view (no copy: the source is contiguous)."""
        src = self.source
        if isinstance(src, torch.Tensor):
            if self.meta.nbytes == 0:
                return memoryview(b"")
            return src.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        if isinstance(src, np.ndarray):
            return src.reshape(-1).view(np.uint8).data.cast("B")
        return memoryview(src).cast("B")

    def write_into(self, buf: memoryview, offset: int) -> None:
        """Copy the value's bytes into ``buf[offset:offset+nbytes]`` (a single memcpy)."""
        n = self.meta.nbytes
        if n == 0:
            return
        src = self.source
        if isinstance(src, torch.Tensor):
            dst = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=offset)
            dst.copy_(src.reshape(-1).view(torch.uint8))
        elif isinstance(src, np.ndarray):
            dst_np = np.frombuffer(buf, dtype=np.uint8, count=n, offset=offset)
            np.copyto(dst_np, src.reshape(-1).view(np.uint8))
        else:
            buf[offset : offset + n] = src


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`torch_dtype_name`, rejecting anything that is not a dtype."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise UnsupportedData(f"unknown torch dtype {name!r}")
    return dt


def encode(data: Any) -> Encoded:
    """Describe ``data`` for the arena. CPU tensors only; CUDA tensors go through :mod:`.gpu`."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise UnsupportedData(f"encode() handles CPU tensors; got a tensor on {data.device}")
        t = data.detach().contiguous()
        meta = DataMeta(
            kind="torch",
            dtype=torch_dtype_name(t.dtype),
            shape=list(t.shape),
            nbytes=t.numel() * t.element_size(),
        )
        return Encoded(meta, t)
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise UnsupportedData("numpy arrays of Python objects cannot be sent")
        a = np.ascontiguousarray(data)
        return Encoded(DataMeta(kind="numpy", dtype=a.dtype.str, shape=list(a.shape), nbytes=a.nbytes), a)
    _check_plain(data)
    raw = pickle.dumps(data, protocol=5)
    return Encoded(DataMeta(kind="object", nbytes=len(raw)), raw)


def decode(meta: DataMeta, buf: memoryview | Any, offset: int, copy: bool) -> Any:
    """Rebuild a value from ``buf[offset:]``; tensors are zero-copy views unless ``copy``.

    Views over a read-only mapping cannot be written through numpy (it raises). Torch has no
    read-only tensors: writing into such a view faults the process, so consumers that want to
    mutate pass ``copy=True``.
    """
    n = meta.nbytes
    if meta.kind == "object":
        return _PlainUnpickler(io.BytesIO(bytes(buf[offset : offset + n]))).load()
    if meta.kind == "numpy":
        dtype = np.dtype(meta.dtype)
        if dtype.hasobject:
            raise UnsupportedData("numpy arrays of Python objects cannot be received")
        count = n // dtype.itemsize if dtype.itemsize else 0
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(meta.shape)
        return arr.copy() if copy else arr
    if meta.kind == "torch":
        dt = torch_dtype(meta.dtype)
        if n == 0:
            return torch.empty(meta.shape, dtype=dt)
        numel = n // torch.empty((), dtype=dt).element_size()
        with warnings.catch_warnings():
            # A view over a read-only mapping is intentional: see the docstring.
            warnings.filterwarnings(
                "ignore", message="The given buffer is not writable", category=UserWarning
            )
            t = torch.frombuffer(buf, dtype=dt, count=numel, offset=offset).view(meta.shape)
        return t.clone() if copy else t
    raise UnsupportedData(f"data kind {meta.kind!r} is not stored in a CPU arena")
