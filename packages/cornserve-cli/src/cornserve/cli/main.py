"""The `cornserve` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from cornserve.app import AppValidationError, trace_app, validate_app
from cornserve.task.errors import TaskError


def _load_json_arg(value: str) -> Any:
    """A JSON argument given inline, as `@file`, or `-` for standard input."""
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        text = Path(value[1:]).read_text()
    else:
        text = value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: the request is not valid JSON: {exc}") from exc


def _cmd_trace(args: argparse.Namespace) -> int:
    path = Path(args.app)
    try:
        source = path.read_text()
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        spec = validate_app(source, name=path.stem)
    except AppValidationError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    request = _load_json_arg(args.request)
    try:
        graphs = asyncio.run(trace_app(spec, request))
    except (TaskError, ValueError) as exc:
        print(f"error: tracing {path} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    mode = "streams" if spec.streaming else "returns"
    print(f"app {path.name}: serve({spec.request_model.__name__}) {mode} {spec.response_model.__name__}")
    print(f"unit tasks to deploy ({len(spec.unit_tasks)}):")
    for task in spec.unit_tasks:
        print(f"  - {task.deployment_key}  {task.display_name()} via {type(task.descriptor).__name__}")
    for index, graph in enumerate(graphs):
        print(
            f"\ngraph {index + 1} of {len(graphs)}: {len(graph.invocations)} invocations, {len(graph.edges)} forward edges"
        )
        print(graph.describe(), end="")
        if args.format in ("mermaid", "all"):
            print("\n" + graph.to_mermaid(), end="")
        if args.format in ("dot", "all"):
            print("\n" + graph.to_dot(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `cornserve`."""
    parser = argparse.ArgumentParser(prog="cornserve", description="Cornserve: serve multimodal AI apps.")
    commands = parser.add_subparsers(dest="command", required=True)
    trace = commands.add_parser(
        "trace", help="print the task graphs an app makes for a request, executing nothing"
    )
    trace.add_argument("app", help="the app's Python file")
    trace.add_argument("--request", required=True, help="the request as JSON, @file, or - for stdin")
    trace.add_argument("--format", choices=["text", "mermaid", "dot", "all"], default="mermaid")
    trace.set_defaults(func=_cmd_trace)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cornserve` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
