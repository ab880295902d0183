"""Benchmark: what page size does to a copy into a sidecar arena (4 KiB tmpfs pages against 2 MiB pages).

Why: issue 15 lists hugepage-backed arenas among the sidecar's directions, and `arena.py` asks for
transparent huge pages (`MADV_HUGEPAGE`) on the belief that copies into 4 KiB tmpfs pages run ~3x
slower. This measures the copy alone, in one process, with nothing else in the way, into:

- **process memory, same buffer**: `Tensor.copy_` into one preallocated tensor, again and again
  (the "memcpy" floor row of `bench/sidecar.py`: its destination is warm in the cache);
- **process memory, rotating**: into successive blocks of a prefaulted `--arena-mib` buffer
  (each copy's destination is cold, as an arena block handed out by the allocator is);
- **/dev/shm arena, rotating** (and **same block**): a real sidecar arena (`cornserve.sidecar.arena`:
  a server's `Arena`, prefaulted as `--prefault` does, mapped writable as a producer's client maps
  its own with `map_arena`; both `MADV_HUGEPAGE`, whose effect depends on
  `/sys/kernel/mm/transparent_hugepage/shmem_enabled`, printed);
- **hugetlb 2 MiB pages, rotating** (and **same block**): a shared `MAP_HUGETLB` mapping, only
  when the host has enough huge pages reserved (`vm.nr_hugepages`; reserving them needs root:
  `echo N > /proc/sys/vm/nr_hugepages`).

Median of `--reps` copies per row after 3 warm-up copies; torch on one thread (as an executor).

    uv run python bench/arena_pages.py [--sizes 1,16,64] [--arena-mib 1024] [--reps 60]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import secrets
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from cornserve.sidecar.arena import Arena, arena_name, map_arena

MIB = 1 << 20
MAP_HUGETLB = 0x40000
"""Linux's flag (Python's mmap module does not export it)."""
HUGE_PAGE = 2 * MIB
THP_SHMEM = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def timed_copies(src: torch.Tensor, destination: Callable[[int], torch.Tensor], reps: int) -> float:
    """Median ms of `reps` copies of `src` into `destination(i)` (3 untimed first)."""
    times = []
    for i in range(reps + 3):
        dst = destination(i)
        t0 = time.perf_counter()
        dst.copy_(src)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def rotating(whole: torch.Tensor, elements: int) -> Callable[[int], torch.Tensor]:
    """Successive blocks of `whole` of `elements` floats, wrapping around."""
    blocks = whole.numel() // elements
    return lambda i: whole[(i % blocks) * elements : (i % blocks + 1) * elements]


def as_floats(buffer: mmap.mmap) -> torch.Tensor:
    """A float32 view of a mapping (torch warns that mmap buffers are not resizable: expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=torch.float32)


def sidecar_arena(size: int) -> tuple[Arena, mmap.mmap]:
    """A server's arena, prefaulted, and the writable mapping a producer's client would copy into."""
    arena = Arena(arena_name("bench-arena-pages", 0, secrets.token_hex(4)), size)
    try:
        arena.prefault()
        return arena, map_arena(arena.name, writable=True, populate=True)
    except BaseException:
        arena.close()
        raise


def hugetlb(size: int) -> tuple[mmap.mmap | None, str]:
    """A shared anonymous mapping of 2 MiB pages, every page written, or None and why there is none."""
    free = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            free = int(line.split()[1])
    if free * HUGE_PAGE < size:
        return None, (
            f"{free} free 2 MiB pages, {size // HUGE_PAGE} needed (vm.nr_hugepages; reserving them needs root)"
        )
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    except OSError as exc:
        return None, f"a MAP_HUGETLB mapping of {size} bytes was refused: {exc}"
    as_floats(mm).zero_()
    return mm, ""


def main() -> None:
    """Print one table: rows per destination, columns per size, and each row's ratio to the floor."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,16,64", help="MiB per copy, comma-separated")
    parser.add_argument("--arena-mib", type=int, default=1024, help="size of each rotating destination")
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(size <= 0 or size > args.arena_mib for size in sizes):
        raise SystemExit(
            f"--sizes {args.sizes}: every size must be from 1 to --arena-mib ({args.arena_mib}) MiB"
        )
    arena_bytes = args.arena_mib * MIB
    thp = THP_SHMEM.read_text().strip() if THP_SHMEM.exists() else "unknown"
    print(
        f"shmem_enabled: {thp}; page size {mmap.PAGESIZE} B; torch threads 1; median of {args.reps} copies\n"
    )

    process = torch.zeros(arena_bytes // 4)
    arena, shm = sidecar_arena(arena_bytes)
    huge, no_huge = hugetlb(arena_bytes)
    views = {"process": process, "shm": as_floats(shm)}
    if huge is not None:
        views["huge"] = as_floats(huge)
    try:
        destinations: dict[str, Callable[[int], Callable[[int], torch.Tensor]]] = {
            "process memory, same buffer (floor)": lambda n: lambda _i: views["process"][:n],
            "process memory, rotating": lambda n: rotating(views["process"], n),
            "/dev/shm arena, same block": lambda n: lambda _i: views["shm"][:n],
            "/dev/shm arena, rotating": lambda n: rotating(views["shm"], n),
        }
        if huge is not None:
            destinations["hugetlb 2 MiB pages, same block"] = lambda n: lambda _i: views["huge"][:n]
            destinations["hugetlb 2 MiB pages, rotating"] = lambda n: rotating(views["huge"], n)
        results: dict[str, list[float]] = {name: [] for name in destinations}
        for size in sizes:
            n = size * MIB // 4
            src = torch.rand(n)
            for name, make in destinations.items():
                results[name].append(timed_copies(src, make(n), args.reps))
        print("| destination | " + " | ".join(f"{s} MiB ms (x floor)" for s in sizes) + " |")
        print("|---|" + "---:|" * len(sizes))
        floor = results["process memory, same buffer (floor)"]
        for name, row in results.items():
            cells = " | ".join(f"{ms:.3f} ({ms / base:.2f}x)" for ms, base in zip(row, floor, strict=True))
            print(f"| {name} | {cells} |")
        if huge is None:
            print(f"\nno hugetlb rows: {no_huge}")
    finally:
        views.clear()  # the tensors over the mappings go first, or closing them is refused
        arena.close()  # unlinks the file
        for mapping in (shm, huge):
            if mapping is not None:
                with contextlib.suppress(BufferError):  # a view still alive: the process exit unmaps it
                    mapping.close()


if __name__ == "__main__":
    main()
