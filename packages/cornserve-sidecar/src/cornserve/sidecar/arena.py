"""Shared-memory arenas: one file under /dev/shm per sidecar server.

The server creates its arena (mode 0600, so only the same user's executors can map it) and owns
its lifetime; clients map arenas by name: their own server's read-write (to write outputs in place)
and any same-node arena read-only (so a consumer's view cannot corrupt the producer's bytes).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from pathlib import Path

from cornserve.sidecar.ownership import lock_owned, owned_by_a_live_process

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(r"^cornserve-sidecar-[A-Za-z0-9_.-]+$")


def arena_name(node: str, rank: int, instance: str) -> str:
    """File name of the arena of one server instance (unique per restart)."""
    safe_node = re.sub(r"[^A-Za-z0-9_.-]", "_", node)
    return f"cornserve-sidecar-{safe_node}-r{rank}-{instance}"


def stale_prefix(node: str, rank: int) -> str:
    """Prefix shared by every instance's arena of ``(node, rank)``; used to clean up after a crash."""
    safe_node = re.sub(r"[^A-Za-z0-9_.-]", "_", node)
    return f"cornserve-sidecar-{safe_node}-r{rank}-"


def arena_path(name: str) -> Path:
    """Absolute path of an arena, validating the name so a message cannot point us elsewhere."""
    if not _NAME_RE.match(name):
        raise ValueError(f"not a sidecar arena name: {name!r}")
    return SHM_DIR / name


class Arena:
    """A server-owned shared-memory arena (created here, unlinked on close)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.path = arena_path(name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            lock_owned(fd)  # held until close: another server's clean-up leaves a live arena alone
            os.fchmod(fd, 0o600)  # umask-proof
            os.ftruncate(fd, size)
            self.mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._owner_fd = fd
        advise_huge_pages(self.mmap)
        self.view = memoryview(self.mmap)

    def prefault(self) -> None:
        """Write one byte per page so tmpfs allocates every page now rather than on first send."""
        page = mmap.PAGESIZE
        for off in range(0, self.size, page):
            self.view[off] = 0

    def close(self) -> None:
        """Unlink the file; mappings held by clients stay valid until they drop them."""
        self.view.release()
        self.path.unlink(missing_ok=True)
        if self._owner_fd >= 0:
            os.close(self._owner_fd)
            self._owner_fd = -1
        try:
            self.mmap.close()
        except BufferError:
            # A transfer still references the buffer during shutdown; the mapping goes with the process.
            logger.warning(
                "arena %s still referenced at close; leaving the mapping to process exit", self.name
            )

    @staticmethod
    def remove_stale(node: str, rank: int) -> list[str]:
        """Delete arenas left behind by crashed instances of the same (node, rank).

        An arena a live server still owns (another cluster's on this machine) is left alone.
        """
        prefix = stale_prefix(node, rank)
        removed = []
        for p in SHM_DIR.glob(prefix + "*"):
            if owned_by_a_live_process(p):
                continue
            p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed


def map_arena(name: str, writable: bool, populate: bool = False) -> mmap.mmap:
    """Map an existing arena. Read-only mappings make numpy views non-writable by construction.

    ``populate`` (MAP_POPULATE) fills the page tables up front; only sensible for a prefaulted arena.
    """
    path = arena_path(name)
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        mm = mmap.mmap(fd, size, flags=flags, prot=prot)
    finally:
        os.close(fd)
    advise_huge_pages(mm)
    return mm


def advise_huge_pages(mm: mmap.mmap) -> None:
    """Ask for transparent huge pages on the arena (fewer page-table entries to fill and walk).

    Only takes effect where /sys/kernel/mm/transparent_hugepage/shmem_enabled is ``advise`` (or
    ``always``); elsewhere the kernel ignores it. It is kept because it costs nothing, not for a
    measured gain: on the 2-vCPU development VM, copies into 2 MiB pages (THP on tmpfs, or hugetlb)
    showed no consistent difference from copies into 4 KiB pages (`bench/arena_pages.py`: within
    the runs' own spread, faster in one run of three). What makes a copy into an arena block
    slower than a repeated in-process memcpy is the block being cold in the cache, not its page size.
    """
    if hasattr(mmap, "MADV_HUGEPAGE") and len(mm) > 0:
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError as exc:
            logger.debug("MADV_HUGEPAGE not applied: %s", exc)
