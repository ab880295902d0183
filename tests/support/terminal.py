"""Running a command as a user does in a terminal: its stdout and stderr on a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Sequence


def run_in_terminal(
    argv: Sequence[str], env: dict[str, str], timeout_s: float, columns: int = 120
) -> tuple[int, str]:
    """Run `argv` with a pty as its stdout and stderr; returns its exit code and everything it wrote.

    Raises AssertionError (after killing it) when it does not finish within `timeout_s`.
    """
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": "40"},
        close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its side
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"{argv} did not finish within {timeout_s} s: {b''.join(chunks)!r}")
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")
