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

from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from cornserve.bus.control import ProgressEvent
from cornserve.bus.gateway_api import AppSummary
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


def progress_line(event: ProgressEvent, elapsed_s: float) -> str:
    """The plain line of one progress event."""
    detail = f" — {event.message}" if event.message else ""
    return f"  [{elapsed_s:6.1f}s] {event.task_key}: {event.stage}{detail}"


def app_lines(app: AppSummary, elapsed_s: float) -> list[str]:
    """The plain lines of the registered app (and its OpenAI model name, when it speaks OpenAI)."""
    tasks = ", ".join(t.key for t in app.tasks)
    lines = [f"app {app.name!r} is {app.state} ({elapsed_s:.1f}s); tasks: {tasks}"]
    if app.openai_models:
        lines.append(f"  OpenAI-compatible: POST /v1/chat/completions with model {app.openai_models[0]!r}")
    return lines


async def show_deploy(events: AsyncIterator[ProgressEvent | AppSummary], started: float) -> AppSummary | None:
    """Render the events of a registration until its end; returns the app (None if none came)."""
    if not console.fancy():
        app = None
        async for event in events:
            if isinstance(event, ProgressEvent):
                print(progress_line(event, time.monotonic() - started), flush=True)
            else:
                app = event
                print("\n".join(app_lines(event, time.monotonic() - started)), flush=True)
        return app
    return await _live(events, started)


async def _live(events: AsyncIterator[ProgressEvent | AppSummary], started: float) -> AppSummary | None:
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
            if not isinstance(event, ProgressEvent):
                app = event
                continue
            key, stage = event.task_key, str(event.stage)
            if key not in bars:
                bars[key] = progress.add_task("", total=len(STAGES) - 1, key=console.escape(key), stage=stage)
            label = stage.replace("_", " ")
            if stage == "failed":
                label = f"[red]failed[/] {console.escape(event.message)}"
            elif event.message:
                label += f" [dim]{console.escape(event.message)}[/]"
            progress.update(bars[key], completed=stage_step(stage), stage=label)
            if stage in DONE_STAGES or stage == "failed":
                progress.stop_task(bars[key])
    if app is not None:
        elapsed = time.monotonic() - started
        tasks = ", ".join(t.key for t in app.tasks)
        out.print(
            f"[green]✔[/] app [bold]{console.escape(app.name)}[/] is {app.state} "
            f"in {elapsed:.1f}s [dim]tasks: {console.escape(tasks)}[/]"
        )
        if app.openai_models:
            out.print(
                "  OpenAI-compatible: POST /v1/chat/completions with model "
                f"[bold]{console.escape(app.openai_models[0])}[/]"
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
