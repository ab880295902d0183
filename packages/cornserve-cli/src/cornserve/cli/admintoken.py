"""The admin token of a local cluster: from the environment, else the state dir's file, else a new one.

Keeping a generated token in ``<state dir>/admin-token`` (0600) makes it stable across `cornserve up`
runs, so scripts and the CLI keep working after a restart; the gateway reads that file itself
(``--admin-token-file``) so the token is in no process's command line or environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cornserve.runtime.secrets import new_token, read_secret_file, write_secret_file
from cornserve.runtime.statedir import admin_token_path

ADMIN_TOKEN_ENV = "CORNSERVE_ADMIN_TOKEN"


@dataclass(frozen=True)
class AdminToken:
    """The token, the file the gateway should read it from (None: it has it from the environment), and where it lives, for users."""

    value: str = field(repr=False)
    file: Path | None
    where: str


def ensure_admin_token(state_dir: Path) -> AdminToken:
    """``$CORNSERVE_ADMIN_TOKEN``, else the state dir's token file, else a new token written there (0600).

    Raises `cornserve.runtime.secrets.SecretFileError` when the file exists but is unsafe or unreadable.
    """
    from_env = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if from_env:
        return AdminToken(from_env, None, f"${ADMIN_TOKEN_ENV}")
    path = admin_token_path(state_dir)
    if path.exists():
        return AdminToken(read_secret_file(path), path, str(path))
    token = new_token()
    write_secret_file(path, token + "\n")
    return AdminToken(token, path, f"{path} (new)")
