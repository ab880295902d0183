"""`cornserve graph APP REQUEST`: an app's task graph for one request, as Mermaid (and SVG via Graphviz).

The graph comes from the same tracing as `cornserve trace` (`cornserve.app.trace_app`, which runs
the app's `serve` under `cornserve.task.TracingRunner`): nothing executes and no cluster is needed.
Mermaid text goes to standard output (paste it into Markdown, GitHub renders it); ``--svg FILE``
also renders the DOT form with Graphviz's `dot` when it is installed.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

from cornserve.app import AppSpec, AppValidationError, trace_app, validate_app
from cornserve.task.errors import TaskError
from cornserve.task.graph import TaskGraph

DOT_TIMEOUT_S = 60.0
"""Deadline of one `dot` run (a task graph has a handful of nodes: it takes milliseconds)."""


class GraphError(RuntimeError):
    """The app could not be traced or drawn; `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def traced(path: Path, request: Any) -> tuple[AppSpec, list[TaskGraph]]:
    """Validate the app in `path` and trace it on `request` (GraphError: unreadable 2, invalid or failing 1)."""
    try:
        source = path.read_text()
    except OSError as exc:
        hint = (
            ""
            if path.suffix == ".py"
            else " (APP is the app's Python file, as given to `cornserve register`)"
        )
        raise GraphError(f"cannot read {path}: {exc.strerror}{hint}", 2) from None
    try:
        spec = validate_app(source, name=path.stem)
    except AppValidationError as exc:
        raise GraphError(f"{path}: {exc}") from None
    try:
        return spec, asyncio.run(trace_app(spec, request))
    except (TaskError, ValueError) as exc:
        raise GraphError(f"tracing {path} failed: {type(exc).__name__}: {exc}") from None


def mermaid(graphs: list[TaskGraph]) -> str:
    """The Mermaid text of every graph (a `%%` comment line separates several)."""
    return join_mermaid([g.to_mermaid() for g in graphs])


def join_mermaid(texts: list[str]) -> str:
    """Several graphs' Mermaid texts as one output (a `%%` comment line before each of several)."""
    if len(texts) == 1:
        return texts[0].rstrip("\n") + "\n"
    return "\n".join(f"%% graph {i + 1} of {len(texts)}\n{t.rstrip()}\n" for i, t in enumerate(texts))


def svg_paths(target: Path, count: int) -> list[Path]:
    """Where the SVGs go: `target` for one graph, `<stem>-<n><suffix>` beside it for several."""
    if count == 1:
        return [target]
    suffix = target.suffix or ".svg"
    return [target.with_name(f"{target.stem}-{i + 1}{suffix}") for i in range(count)]


def write_svgs(graphs: list[TaskGraph], target: Path) -> list[Path]:
    """Render each graph with Graphviz `dot` (GraphError when it is missing or fails)."""
    return render_svgs([g.to_dot() for g in graphs], target)


def render_svgs(dots: list[str], target: Path) -> list[Path]:
    """Render each DOT text with Graphviz `dot` (GraphError when it is missing or fails)."""
    dot = shutil.which("dot")
    if dot is None:
        raise GraphError(
            "--svg needs Graphviz's `dot` on PATH (e.g. `apt-get install graphviz` or `brew install "
            "graphviz`); the Mermaid text above needs nothing"
        )
    written = []
    for dot_text, path in zip(dots, svg_paths(target, len(dots)), strict=True):
        try:
            done = subprocess.run(
                [dot, "-Tsvg", "-o", str(path)],
                input=dot_text,
                capture_output=True,
                text=True,
                timeout=DOT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise GraphError(f"`dot` did not finish within {DOT_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            raise GraphError(f"`dot` failed (exit {done.returncode}): {done.stderr.strip()}")
        written.append(path)
    return written
