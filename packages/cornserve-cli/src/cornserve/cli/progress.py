"""Deployment progress of `cornserve register` (and the demo): live bars on a terminal, lines otherwise.

The gateway streams the resource manager's progress events while it deploys an app's unit tasks
(`POST /apps` with ``Accept: text/event-stream``): one event per task and stage, then the app. On a
terminal each task gets a bar that moves through the stages, with the elapsed time; through a pipe
each event is one line (the format scripts and tests read).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from cornserve.cli import console

STAGES = ("queued", "allocating", "starting_task_manager", "starting_executors", "ready")
"""A deployment's stages in order (`cornserve.bus.control.ProgressEvent.stage`); "shared" (another
app already runs the task) and "ready" both complete it, "failed" ends it."""
DONE_STAGES = ("ready", "shared")


def stage_step(stage: str) -> int:
    """How far along the bar a stage is (unknown stages: not moved)."""
    if stage in DONE_STAGES:
        return len(STAGES) - 1
    return STAGES.index(stage) if stage in STAGES else 0


def progress_line(event: dict[str, Any], elapsed_s: float) -> str:
    """The plain line of one progress event."""
    detail = f" — {event['message']}" if event.get("message") else ""
    return f"  [{elapsed_s:6.1f}s] {event['task_key']}: {event['stage']}{detail}"


def app_line(app: dict[str, Any], elapsed_s: float) -> str:
    """The plain line of the registered app."""
    tasks = ", ".join(t["key"] for t in app.get("tasks", []))
    return f"app {app['name']!r} is {app['state']} ({elapsed_s:.1f}s); tasks: {tasks}"


async def show_deploy(events: AsyncIterator[dict[str, Any]], started: float) -> dict[str, Any] | None:
    """Render the events of a registration until its end; returns the app (None if none came)."""
    if not console.fancy():
        app = None
        async for event in events:
            if "stage" in event:
                print(progress_line(event, time.monotonic() - started), flush=True)
            else:
                app = event
                print(app_line(event, time.monotonic() - started), flush=True)
        return app
    return await _live(events, started)


async def _live(events: AsyncIterator[dict[str, Any]], started: float) -> dict[str, Any] | None:
    out = console.stdout()
    columns = (
        SpinnerColumn(finished_text="[green]✔[/]"),
        TextColumn("[bold]{task.fields[key]}[/]"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
    )
    bars: dict[str, TaskID] = {}
    app = None
    with Progress(*columns, console=out, transient=False) as progress:
        async for event in events:
            if "stage" not in event:
                app = event
                continue
            key = str(event["task_key"])
            stage = str(event["stage"])
            if key not in bars:
                bars[key] = progress.add_task("", total=len(STAGES) - 1, key=key, stage=stage)
            label = stage.replace("_", " ")
            if stage == "failed":
                label = f"[red]failed[/] {console.escape(str(event.get('message', '')))}"
            elif event.get("message"):
                label += f" [dim]{console.escape(str(event['message']))}[/]"
            progress.update(bars[key], completed=stage_step(stage), stage=label)
            if stage in DONE_STAGES or stage == "failed":
                progress.stop_task(bars[key])
    if app is not None:
        elapsed = time.monotonic() - started
        tasks = ", ".join(t["key"] for t in app.get("tasks", []))
        out.print(
            f"[green]✔[/] app [bold]{console.escape(app['name'])}[/] is {app['state']} "
            f"in {elapsed:.1f}s [dim]tasks: {console.escape(tasks)}[/]"
        )
    return app


def show_build(arch: str, out_dir: Path, seed: int) -> Path:
    """`build_tiny` with a bar over its steps on a terminal (nothing extra through a pipe)."""
    from cornserve.models.tiny import BUILD_STEPS, build_tiny  # heavy: torch and transformers

    if not console.fancy():
        return build_tiny(arch, out_dir, seed=seed)
    columns = (
        SpinnerColumn(finished_text="[green]✔[/]"),
        TextColumn(f"building tiny [bold]{console.escape(arch)}[/]"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console.stdout()) as progress:
        bar = progress.add_task("", total=len(BUILD_STEPS), step="loading")

        def on_step(name: str) -> None:
            progress.update(bar, completed=BUILD_STEPS.index(name), step=name)

        path = build_tiny(arch, out_dir, seed=seed, on_step=on_step)
        progress.update(bar, completed=len(BUILD_STEPS), step="done")
    return path
