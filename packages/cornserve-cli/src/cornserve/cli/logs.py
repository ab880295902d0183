"""`cornserve logs TARGET [-f]`: the log files of a task, an app's tasks, or a service of a local cluster.

Every process `cornserve up` starts logs to ``<state dir>/logs``: services as ``<name>.log``
(``gateway``, ``resource-manager``, ``dispatcher-0``, ``sidecar-0``, ``nats``), and the resource
manager's spawner names the data plane after the task's deployment key: its task manager logs to
``tm-<key>.log`` and each executor to ``<key>.<executor id>.log``. A target is a service name, a
task key (`cornserve tasks`), or an app name (the gateway says which task keys the app uses); a
single file's name without `.log` (``tm-<key>``, ``<key>.<executor id>``) shows just that file.

``-f`` follows the files until Ctrl-C, also picking up executors started later (a scale-up): it is
the one loop of the CLI without a deadline, because it ends when the user says so.
"""

from __future__ import annotations

import glob
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cornserve.cli import console

POLL_S = 0.25
"""How often `-f` reads the files for new lines."""
RESCAN_S = 1.0
"""How often `-f` looks for new log files (an executor started after the command)."""
PREFIX_STYLES = ("cyan", "magenta", "green", "yellow", "blue", "bright_cyan", "bright_magenta")


class NoLogsError(LookupError):
    """Nothing in the log directory belongs to the target."""


def task_patterns(log_dir: Path, key: str) -> list[str]:
    """Globs of a task's logs: its task manager's and its executors'."""
    base = glob.escape(str(log_dir))
    name = glob.escape(key)
    return [f"{base}/tm-{name}.log", f"{base}/{name}.*.log"]


def matching(patterns: Sequence[str]) -> list[Path]:
    """The files matching any of `patterns`, sorted, each once."""
    return sorted({Path(p) for pattern in patterns for p in glob.glob(pattern)})


def resolve(log_dir: Path, target: str, app_task_keys: Callable[[str], list[str]]) -> list[str]:
    """The globs of `target`'s logs: a service, else a task key, else an app (via `app_task_keys`).

    `app_task_keys` asks the gateway and raises when it has no such app (CornserveError 404).
    Raises NoLogsError when the target's files do not exist (yet).
    """
    if not log_dir.is_dir():
        raise NoLogsError(f"there is no log directory {log_dir} (is --state-dir that of `cornserve up`?)")
    if "/" in target or target in ("", ".", ".."):
        raise NoLogsError(f"{target!r} is not a task key, app or service name")
    service = log_dir / f"{target}.log"
    if service.is_file():  # a service, or one file named exactly (`tm-<key>`, `<key>.<executor id>`)
        return [glob.escape(str(service))]
    patterns = task_patterns(log_dir, target)
    if matching(patterns):
        return patterns
    keys = app_task_keys(target)
    patterns = [p for key in keys for p in task_patterns(log_dir, key)]
    if not matching(patterns):
        raise NoLogsError(
            f"app {target!r} has no task logs in {log_dir} (tasks: {', '.join(keys) or 'none'})"
        )
    return patterns


@dataclass
class LogFile:
    """One file being read: where its next unread byte is, and an unfinished last line."""

    path: Path
    offset: int = 0
    partial: bytes = b""

    def read_new(self) -> list[str]:
        """The complete lines appended since the last read (from the start after a truncation)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # truncated or replaced: read it anew
            self.offset, self.partial = 0, b""
        if size == self.offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in lines]


def last_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last `count` lines of a file (all of them when `count` is 0) and the offset after them."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete_end = len(data) - len(lines[-1])  # an unfinished last line is printed when it ends
    lines = lines[:-1]
    if count > 0:
        lines = lines[-count:]
    return [line.decode(errors="replace") for line in lines], complete_end


@dataclass
class LogPrinter:
    """Prints lines of several files, each prefixed with its file's name when there are several."""

    prefixed: bool
    styles: dict[Path, str] = field(default_factory=dict)

    def label(self, path: Path) -> str:
        """A file's prefix: its name without `.log` (`tm-<key>`, `<key>.<executor id>`)."""
        return path.name.removesuffix(".log")

    def print(self, path: Path, lines: list[str]) -> None:
        """Write `lines` of `path` (plain, or with a coloured prefix on a terminal)."""
        if not lines:
            return
        if not console.fancy():
            prefix = f"{self.label(path)} | " if self.prefixed else ""
            sys.stdout.write("".join(f"{prefix}{line}\n" for line in lines))
            sys.stdout.flush()
            return
        out = console.stdout()
        style = self.styles.setdefault(path, PREFIX_STYLES[len(self.styles) % len(PREFIX_STYLES)])
        for line in lines:
            prefix = f"[{style}]{console.escape(self.label(path))}[/] [dim]|[/] " if self.prefixed else ""
            out.print(prefix + console.escape(line), soft_wrap=True)


def show_logs(patterns: list[str], tail: int, follow: bool) -> int:
    """Print the last `tail` lines of each file; with `follow`, then new lines until Ctrl-C."""
    files: dict[Path, LogFile] = {}
    paths = matching(patterns)
    printer = LogPrinter(prefixed=len(patterns) > 1)
    for path in paths:
        lines, offset = last_lines(path, tail)
        printer.print(path, lines)
        files[path] = LogFile(path, offset)
    if not follow:
        return 0
    try:
        rescanned = time.monotonic()
        while True:  # no deadline: following ends with Ctrl-C
            if time.monotonic() - rescanned >= RESCAN_S:
                rescanned = time.monotonic()
                for path in matching(patterns):
                    files.setdefault(path, LogFile(path))  # a new executor: its whole log
            for log in files.values():
                printer.print(log.path, log.read_new())
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        return 0
