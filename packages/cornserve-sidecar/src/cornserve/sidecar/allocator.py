"""Variable-size first-fit allocator over a byte range, with coalescing of free space.

The arena has no fixed slot size: any request that fits some free block succeeds. Freed blocks
merge with free neighbours immediately, so a fully freed arena is again one block. Pure
bookkeeping (offsets only), so it is unit-testable without shared memory.
"""

from __future__ import annotations

import bisect

ALIGNMENT = 64
"""Every block starts on a 64-byte boundary (cache line; what SIMD kernels and torch expect)."""


class OutOfMemory(Exception):
    """No free block is large enough right now."""


def aligned(size: int) -> int:
    """``size`` rounded up to :data:`ALIGNMENT`; zero-byte requests still get one unit of identity."""
    return max(ALIGNMENT, (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT)


class Allocator:
    """First-fit free list sorted by offset; free merges with both neighbours."""

    def __init__(self, capacity: int) -> None:
        if capacity < ALIGNMENT:
            raise ValueError(f"arena capacity must be at least {ALIGNMENT} bytes, got {capacity}")
        self.capacity = capacity - capacity % ALIGNMENT
        self._free_offsets: list[int] = [0]
        self._free_sizes: dict[int, int] = {0: self.capacity}
        self._used: dict[int, int] = {}
        self.used_bytes = 0

    def alloc(self, size: int) -> int:
        """Reserve ``size`` bytes; returns the offset. Raises :class:`OutOfMemory`."""
        need = aligned(size)
        if need > self.capacity:
            raise OutOfMemory(f"{size} bytes exceed the arena capacity {self.capacity}")
        for i, off in enumerate(self._free_offsets):
            block = self._free_sizes[off]
            if block >= need:
                del self._free_sizes[off]
                if block == need:
                    del self._free_offsets[i]
                else:
                    self._free_offsets[i] = off + need
                    self._free_sizes[off + need] = block - need
                self._used[off] = need
                self.used_bytes += need
                return off
        raise OutOfMemory(
            f"no free block of {need} bytes (free {self.free_bytes}, largest {self.largest_free_block})"
        )

    def free(self, offset: int) -> int:
        """Release the block at ``offset``; returns its size. Raises KeyError on a double free."""
        size = self._used.pop(offset)
        self.used_bytes -= size
        i = bisect.bisect_left(self._free_offsets, offset)
        start, length = offset, size
        # Merge with the following free block.
        if i < len(self._free_offsets) and self._free_offsets[i] == offset + size:
            nxt = self._free_offsets.pop(i)
            length += self._free_sizes.pop(nxt)
        # Merge with the preceding free block.
        if i > 0:
            prev = self._free_offsets[i - 1]
            if prev + self._free_sizes[prev] == offset:
                self._free_sizes[prev] += length
                return size
        self._free_offsets.insert(i, start)
        self._free_sizes[start] = length
        return size

    def size_of(self, offset: int) -> int:
        """Size of the live block at ``offset`` (KeyError if none)."""
        return self._used[offset]

    def owns(self, offset: int) -> bool:
        """Whether a live block starts at ``offset``."""
        return offset in self._used

    @property
    def arena_bytes(self) -> int:
        """Usable size of the managed range (the capacity, aligned down)."""
        return self.capacity

    @property
    def free_bytes(self) -> int:
        """Total free bytes (possibly fragmented)."""
        return self.capacity - self.used_bytes

    @property
    def largest_free_block(self) -> int:
        """Largest single allocation that would succeed now."""
        return max(self._free_sizes.values(), default=0)

    @property
    def free_blocks(self) -> int:
        """Number of free blocks; 1 when nothing is allocated (everything coalesced)."""
        return len(self._free_offsets)

    @property
    def allocations(self) -> int:
        """Number of live blocks."""
        return len(self._used)
