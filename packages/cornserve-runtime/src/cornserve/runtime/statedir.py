"""Where a local cluster keeps its state, and the names of the files in it that others read.

`cornserve up` writes there (logs, the NATS store, `cluster.json`, the admin token); the CLI and
`cornserve.client` read the admin token back from there. One function decides the directory so
that both sides always agree.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "CORNSERVE_STATE_DIR"
"""Overrides the default state dir for `cornserve up`/`down`/`demo`, the CLI and the client."""

ADMIN_TOKEN_FILE = "admin-token"
"""The gateway's admin token in the state dir (0600), written by `cornserve up` when none is set."""


def default_state_dir() -> Path:
    """`$CORNSERVE_STATE_DIR`, else `$XDG_STATE_HOME/cornserve`, else `~/.local/state/cornserve`."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cornserve"


def admin_token_path(state_dir: Path) -> Path:
    """The admin token file of the cluster whose state lives in `state_dir`."""
    return state_dir / ADMIN_TOKEN_FILE
