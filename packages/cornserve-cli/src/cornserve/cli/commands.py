"""CLI commands that talk to a running cluster's gateway."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from cornserve.cli import console
from cornserve.cli.answers import show_answer
from cornserve.cli.chat import chunk_text, chunk_usage
from cornserve.cli.progress import show_deploy
from cornserve.cli.tables import print_table
from cornserve.client import CornserveClient


def load_json_arg(value: str) -> Any:
    """A JSON argument given inline, as `@file`, or `-` for standard input."""
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            raise SystemExit(f"error: cannot read {value[1:]}: {exc.strerror}") from exc
    else:
        text = value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: the request is not valid JSON: {exc}") from exc


def read_source(path: str) -> str:
    """A Python file's text, or exit with a clear error."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror}") from exc


async def status(client: CornserveClient) -> int:
    """Health, services, apps and tasks at a glance."""
    try:
        health = await client.health()
    except Exception as exc:
        print(f"cluster at {client.url}: not healthy ({exc})")
        return 1
    apps = await client.list_apps()
    tasks = (await client.list_tasks()).tasks
    services = sorted(health.services.items())
    if not console.fancy():
        print(f"cluster at {client.url}: {health.status}")
        print("services: " + ", ".join(f"{name} x{count}" for name, count in services))
        print(f"apps: {len(apps)}   deployed unit tasks: {len(tasks)}")
        return 0
    out = console.stdout()
    colour = "green" if health.status == "ok" else "red"
    out.print(f"cluster at [bold]{console.escape(client.url)}[/]: [{colour}]{health.status}[/]")
    print_table(["SERVICE", "REPLICAS"], [(name, count) for name, count in services], "no services")
    out.print(f"apps: [bold]{len(apps)}[/]   deployed unit tasks: [bold]{len(tasks)}[/]")
    return 0


async def register(client: CornserveClient, path: str, name: str | None) -> int:
    """Register an app, printing deployment progress as it happens."""
    source = read_source(path)
    app_name = name or Path(path).stem.replace("_", "-")
    start = time.monotonic()
    if console.fancy():
        console.stdout().print(
            f"registering app [bold]{console.escape(app_name)}[/] from {console.escape(path)}"
        )
    else:
        print(f"registering app {app_name!r} from {path} ...", flush=True)
    await show_deploy(client.register_app(app_name, source), start)
    return 0


async def apps(client: CornserveClient) -> int:
    """List registered apps."""
    rows = [(a.name, a.state, "yes" if a.streaming else "no", len(a.tasks)) for a in await client.list_apps()]
    print_table(["NAME", "STATE", "STREAMS", "TASKS"], rows, "no apps registered", state_column=1)
    return 0


async def invoke(client: CornserveClient, app: str, request: str, text: bool = False) -> int:
    """Invoke an app; streamed items are printed as they arrive (`cornserve.cli.answers`).

    With `text`, an app that streams chat-completion chunks has only their text printed, as it
    arrives, and the token usage after it.
    """
    payload = load_json_arg(request)
    if not text:
        await show_answer(client.invoke_app(app, payload))
        return 0
    usage = None
    clean = console.printable if console.fancy() else str  # a pipe gets the text as sent
    async for item in client.invoke_app(app, payload):
        print(clean(chunk_text(item)), end="", flush=True)
        usage = chunk_usage(item) or usage
    print()
    if usage:
        print(f"usage: {usage}", file=sys.stderr)
    return 0


async def unregister(client: CornserveClient, app: str) -> int:
    """Unregister an app."""
    reply = await client.unregister_app(app)
    torn = ", ".join(reply.torn_down) or "none (still used elsewhere)"
    print(f"unregistered {app!r}; tasks torn down: {torn}")
    return 0


async def tasks(client: CornserveClient) -> int:
    """List deployed unit tasks."""
    state = await client.list_tasks()
    rows = []
    for t in state.tasks:
        ready = sum(1 for e in t.executors if e.state == "ready")
        devices = ",".join(f"{d.kind}:{d.index}" for d in t.devices)
        rows.append((t.key, t.state, f"{ready}/{len(t.executors)}", devices, ",".join(t.users)))
    print_table(["KEY", "STATE", "EXECUTORS", "DEVICES", "USERS"], rows, "no tasks deployed", state_column=1)
    free = sum(1 for d in state.devices if d.task_key is None)
    print(f"devices: {len(state.devices)} ({free} free)")
    return 0


async def scale(client: CornserveClient, key: str, count: int) -> int:
    """Scale a task to `count` executors."""
    info = await client.scale_task(key, count)
    print(f"{key}: {len(info.executors)} executor(s), state {info.state}")
    return 0


async def tasklib_add(client: CornserveClient, path: str, name: str | None) -> int:
    """Upload a task library."""
    source = read_source(path)
    lib_name = name or Path(path).stem.replace("_", "-").lower()
    record = await client.add_tasklib(lib_name, source)
    print(
        f"task library {record.name!r} ({record.sha256[:12]}): unit tasks {', '.join(record.unit_tasks) or '-'}; "
        f"descriptors {', '.join(record.descriptors) or '-'}"
    )
    return 0


async def tasklib_list(client: CornserveClient) -> int:
    """List task libraries."""
    rows = [
        (r.name, r.sha256[:12], ",".join(r.unit_tasks), ",".join(r.descriptors))
        for r in await client.list_tasklibs()
    ]
    print_table(["NAME", "SHA256", "UNIT TASKS", "DESCRIPTORS"], rows, "no task libraries")
    return 0
