"""Where the CLI writes, and whether it may draw: colour, tables and live bars only on a terminal.

Scripts and tests read the CLI's stdout through a pipe; there it keeps the plain line format it
always had (no colour codes, no cursor movement), so `grep`/`awk` and the tests that parse it keep
working. On a terminal the same commands draw rich tables and live progress bars. ``NO_COLOR``
keeps the drawing but drops colour; ``TERM=dumb`` (or ``CORNSERVE_PLAIN=1``) forces plain lines.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO

from rich.console import Console

PLAIN_ENV = "CORNSERVE_PLAIN"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")
"""Control characters other than newline and tab: never written raw to a terminal (a model's answer
could hold escape sequences that move the cursor or retitle the terminal)."""


_consoles: dict[str, Console] = {}


def _on(name: str, file: TextIO) -> Console:
    """The one console writing to `file` (a new one when the stream was swapped, as tests do).

    Lines printed while a live bar or spinner runs must go through the console that draws it, or
    they garble its frame.
    """
    current = _consoles.get(name)
    if current is None or current.file is not file:
        current = _consoles[name] = Console(file=file, highlight=False, soft_wrap=True)
    return current


def stdout() -> Console:
    """The console on the current standard output."""
    return _on("stdout", sys.stdout)


def stderr() -> Console:
    """The console on the current standard error (errors and warnings)."""
    return _on("stderr", sys.stderr)


def fancy() -> bool:
    """Whether standard output is a terminal that may get tables, colour and live bars."""
    if os.environ.get(PLAIN_ENV, "").strip() not in ("", "0"):
        return False
    console = stdout()
    return console.is_terminal and not console.is_dumb_terminal


def error(message: str) -> None:
    """One ``error: ...`` line on standard error (red on a terminal)."""
    if stderr().is_terminal and not stderr().is_dumb_terminal:
        stderr().print(f"[bold red]error[/]: {escape(message)}")
    else:
        print(f"error: {message}", file=sys.stderr)


def escape(text: str) -> str:
    """`text` with rich markup characters escaped, for printing untrusted strings."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def printable(text: str) -> str:
    """`text` without control characters (for writing text from the network to a terminal)."""
    return CONTROL.sub("", text)
