"""Where a server's same-node control socket lives, and the checks on a path a message names.

The socket sits in its own directory under /dev/shm (next to the arenas), created with mode 0700,
and is itself chmod 0600: only the user that runs the sidecars (and so may map their arenas anyway)
can connect. The directory name carries node, rank and instance like an arena's, so a restarted
server removes what a crashed instance left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from cornserve.bus.sidecar_local import SOCKET_NAME
from cornserve.sidecar.arena import SHM_DIR
from cornserve.sidecar.ownership import owned_by_a_live_process

logger = logging.getLogger(__name__)

PREFIX = "cornserve-sock-"
_PATH_RE = re.compile(r"^/dev/shm/cornserve-sock-[A-Za-z0-9_.-]+/ctl\.sock$")
MAX_PATH = 100
"""sun_path holds 108 bytes; stay well below."""


def _node_part(node: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node)
    if len(safe) > 32:  # long node names (Kubernetes) would overflow sun_path
        safe = hashlib.sha256(node.encode()).hexdigest()[:16]
    return safe


def socket_dir(node: str, rank: int, instance: str) -> Path:
    """The owner-only directory holding one server instance's socket."""
    return SHM_DIR / f"{PREFIX}{_node_part(node)}-r{rank}-{instance}"


def create_socket_dir(node: str, rank: int, instance: str) -> Path:
    """Create (mode 0700) the directory of this instance's socket; returns the socket's path."""
    d = socket_dir(node, rank, instance)
    os.mkdir(d, 0o700)
    os.chmod(d, 0o700)  # umask-proof
    path = d / SOCKET_NAME
    if len(str(path)) > MAX_PATH:
        raise ValueError(f"socket path {path} is too long for a UNIX socket")
    return path


def remove_socket_dir(path: Path) -> None:
    """Remove an instance's socket and its directory (at stop)."""
    shutil.rmtree(path.parent, ignore_errors=True)


def remove_stale_sockets(node: str, rank: int) -> list[str]:
    """Delete socket directories left behind by crashed instances of the same (node, rank).

    A directory a live server still owns (another cluster's on this machine) is left alone.
    """
    removed = []
    for p in SHM_DIR.glob(f"{PREFIX}{_node_part(node)}-r{rank}-*"):
        if (
            p.is_dir()
            and not p.is_symlink()
            and p.stat().st_uid == os.getuid()
            and not owned_by_a_live_process(p)
        ):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def checked_socket_path(value: str) -> Path | None:
    """A socket path from a message, if it is one a sidecar creates and is ours (else None)."""
    if not value or not _PATH_RE.match(value) or ".." in value:
        return None
    path = Path(value)
    try:
        st = path.parent.lstat()
    except OSError:
        return None
    # Only a directory of our own user, not writable by others: nobody else can have put the socket there.
    if not path.parent.is_dir() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path
