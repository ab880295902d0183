import pickle

import numpy as np
import pytest
import torch

from cornserve.sidecar.codec import decode, encode
from cornserve.sidecar.errors import UnsupportedData


def roundtrip(value, copy=False):
    enc = encode(value)
    buf = bytearray(enc.nbytes + 64)
    enc.write_into(memoryview(buf), 64)
    return decode(enc.meta, memoryview(buf), 64, copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float16])
def test_torch_roundtrip(dtype):
    t = (torch.arange(24) % 3).to(dtype).reshape(2, 3, 4)
    out = roundtrip(t)
    assert out.dtype == dtype and out.shape == t.shape and torch.equal(out, t)


def test_noncontiguous_and_empty_tensors():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(roundtrip(t), t)
    e = torch.empty(0, 5)
    assert roundtrip(e).shape == (0, 5)


def test_numpy_roundtrip_stays_numpy():
    a = np.arange(10, dtype=np.float64).reshape(2, 5)
    out = roundtrip(a)
    assert isinstance(out, np.ndarray) and out.dtype == a.dtype
    np.testing.assert_array_equal(out, a)


def test_objects_roundtrip():
    obj = {"k": [1, 2.0, "x", b"y", None, True, {"n": [1]}], 3: "int key"}
    assert roundtrip(obj) == obj
    assert roundtrip("hello") == "hello"


@pytest.mark.parametrize("bad", [object(), {1.5: 1}, [set()], np.array([object()])])
def test_unsupported_values_rejected(bad):
    with pytest.raises(UnsupportedData):
        encode(bad)


def test_restricted_unpickler_refuses_globals():
    from cornserve.bus.sidecar import DataMeta

    evil = pickle.dumps(print)
    meta = DataMeta(kind="object", nbytes=len(evil))
    with pytest.raises(pickle.UnpicklingError):
        decode(meta, memoryview(evil), 0, False)
