import contextlib
import itertools
import random

import pytest

from cornserve.sidecar.allocator import ALIGNMENT, Allocator, OutOfMemory


def test_first_fit_and_coalescing_back_to_one_block():
    a = Allocator(1024)
    x, y, z = a.alloc(100), a.alloc(200), a.alloc(64)
    assert (x, y, z) == (0, 128, 384)
    a.free(y)
    assert a.free_blocks == 2
    a.free(x)  # merges with the hole after it
    assert a.free_blocks == 2
    a.free(z)  # merges both sides and the tail
    assert a.free_blocks == 1 and a.used_bytes == 0 and a.largest_free_block == 1024


def test_any_size_that_fits_succeeds_including_whole_arena_and_zero():
    a = Allocator(4096)
    off = a.alloc(4096)
    assert off == 0
    with pytest.raises(OutOfMemory):
        a.alloc(1)
    a.free(off)
    z = a.alloc(0)
    assert a.size_of(z) == ALIGNMENT
    with pytest.raises(OutOfMemory):
        a.alloc(5000)


def test_double_free_is_an_error():
    a = Allocator(1024)
    off = a.alloc(10)
    a.free(off)
    with pytest.raises(KeyError):
        a.free(off)


def test_fragmentation_then_full_coalesce_randomized():
    rng = random.Random(0)
    a = Allocator(1 << 20)
    live: list[int] = []
    for _ in range(5000):
        if live and (rng.random() < 0.5 or a.free_bytes < 70_000):
            a.free(live.pop(rng.randrange(len(live))))
        else:
            with contextlib.suppress(OutOfMemory):
                live.append(a.alloc(rng.randrange(0, 65_536)))
        # Invariant: blocks never overlap.
        spans = sorted((o, a.size_of(o)) for o in live)
        assert all(o1 + s1 <= o2 for (o1, s1), (o2, _) in itertools.pairwise(spans))
    for off in live:
        a.free(off)
    assert a.used_bytes == 0 and a.free_blocks == 1 and a.largest_free_block == a.capacity
