"""Which files under /dev/shm a live sidecar still owns: an exclusive `flock` held while it runs.

A starting server removes arenas and socket directories that earlier instances of its (node, rank)
left behind when they crashed. Deciding "left behind" by name alone also removes a *live* server's
files when two clusters of the same user share a machine (two `cornserve up`, or two test runs,
both with node ``local`` and rank 0): the other cluster's executors then cannot map its arena or
reach its socket. The kernel knows better: a server holds an exclusive lock on each file it owns
for as long as it runs, the lock dies with the process however it ends, and locks are seen across
PID namespaces (containers sharing /dev/shm), which a recorded PID would not be.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def lock_owned(fd: int) -> None:
    """Mark the open file `fd` as owned by this process until `fd` is closed.

    Raises BlockingIOError when another live process already owns it.
    """
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class OwnedDir:
    """A directory this process owns (its lock is held) until `release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            lock_owned(self._fd)
        except BaseException:
            os.close(self._fd)
            raise

    def release(self) -> None:
        """Give the directory up (idempotent); remove it first if it should go."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def owned_by_a_live_process(path: Path) -> bool:
    """Whether some running process holds `path`'s ownership lock (False when the path is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        lock_owned(fd)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock just taken
    return False
