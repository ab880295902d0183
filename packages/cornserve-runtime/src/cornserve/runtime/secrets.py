"""Secret files: the one way Cornserve creates and reads tokens, keys and credentials on disk.

`cornserve up` generates a cluster's secrets (the gateway's admin token, NATS credentials, the
sidecars' peer key) into its state dir, and services read them back from paths given in their
settings. Keeping both sides here means every secret file is created owner-only (0600) from its
first byte, never world-readable for an instant, and every reader refuses one that others can read.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

SECRET_FILE_MODE = 0o600
"""Owner read/write only."""
TOKEN_BYTES = 32
"""Entropy of a generated token (256 bits)."""
MAX_SECRET_FILE_BYTES = 64 * 1024
"""A secret file larger than this is not one of ours (refused rather than read whole)."""


class SecretFileError(RuntimeError):
    """A secret file is missing, unreadable, too large, or readable by other users."""


def new_token() -> str:
    """A fresh URL-safe random token (for bearer tokens, passwords and shared keys)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def write_secret_file(path: Path, value: str) -> Path:
    """Write `value` to `path` with mode 0600, atomically (a reader sees the old file or the new one).

    The file is created owner-only before any byte is written; the parent directory is created
    (0700) if missing.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_secret_file(path: Path) -> str:
    """The stripped contents of secret file `path`; refuses a file group or others can read or write."""
    try:
        info = path.stat()
    except OSError as exc:
        raise SecretFileError(f"cannot read secret file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecretFileError(f"secret file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise SecretFileError(
            f"secret file {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run `chmod 600 {path}`"
        )
    if info.st_size > MAX_SECRET_FILE_BYTES:
        raise SecretFileError(f"secret file {path} is {info.st_size} bytes; not a secret file")
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"cannot read secret file {path}: {exc}") from None


def constant_time_equal(given: str, expected: str) -> bool:
    """Whether two secrets are equal, in time independent of where they differ."""
    return secrets.compare_digest(given.encode(), expected.encode())
