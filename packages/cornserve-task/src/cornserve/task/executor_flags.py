"""Executor flags a task config may not pass unless an admin allows them.

Some descriptors pass arguments from the task's config to the executor as they are (e.g.
`VLLMDescriptor.extra_args` go to `vllm serve`). Whoever can register an app or open a session
writes that config, so without a check they could make an executor listen on every interface
(`--host 0.0.0.0`), run a model repository's Python code (`--trust-remote-code`), or let network
callers read local files (`--allowed-local-media-path /`). The deny-list below is those flags; the
admin setting ``CORNSERVE_ALLOW_EXECUTOR_FLAGS`` (read by the gateway and by every task manager)
lists the ones this cluster allows anyway.

Matching is deliberately generous, because the executor's parser is: `--flag` and `--flag=value`,
underscores for dashes (vLLM accepts `--trust_remote_code`), dotted JSON keys
(`--kv-events-config.endpoint=...`), and every unambiguous prefix argparse would expand
(`--trust-remote`). Any argument that could mean a denied flag is refused, even where it would only
be the value of another flag.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field

from cornserve.task.errors import ExecutorFlagError

if TYPE_CHECKING:
    from cornserve.task.base import UnitTask

ALLOW_SETTING = "CORNSERVE_ALLOW_EXECUTOR_FLAGS"
"""The admin setting (environment of the gateway and the task managers; `--allow-executor-flags`)."""

EXPOSURE_FLAGS: dict[str, str] = {
    "--host": "binds the executor's HTTP server to another address (e.g. every interface)",
    "--data-parallel-address": "binds vLLM's data-parallel coordination socket to another address",
    "--kv-events-config": "publishes KV-cache events on a socket it binds (e.g. tcp://*:5557)",
    "--kv-transfer-config": "opens KV-transfer connections and listeners at addresses it names",
    "--trust-remote-code": "runs Python code shipped with the model repository",
    "--tool-parser-plugin": "imports a Python file from the node as a tool parser",
    "--allowed-local-media-path": "lets network callers read files on the node as media",
    "--allowed-origins": "lets browsers on other origins call the executor (CORS)",
    "--allow-credentials": "lets browsers send credentials to the executor cross-origin (CORS)",
    "--config": "reads any flag, including the ones above, from a file on the node",
}
"""Executor flags that widen what can reach the executor or what it runs, and why each is listed."""

MIN_PREFIX = len("--x")
"""Shortest argument checked as an abbreviation (argparse expands unambiguous prefixes)."""


def flag_name(arg: str) -> str | None:
    """The long option an argument spells (`--trust_remote_code=1` → `--trust-remote-code`), or None."""
    if not arg.startswith("--") or len(arg) < MIN_PREFIX:
        return None
    name = arg.split("=", 1)[0].split(".", 1)[0]
    return "--" + name[2:].replace("_", "-").lower()


def check_allowed_names(allowed: Iterable[str]) -> list[str]:
    """The admin's allow-list, normalized; an entry that is not a denied flag is a typo: ValueError."""
    names: set[str] = set()
    for entry in allowed:
        entry = entry.strip()
        if not entry:
            continue
        name = flag_name(entry)
        if name not in EXPOSURE_FLAGS:
            raise ValueError(
                f"{ALLOW_SETTING}: {entry!r} is not one of the refused executor flags "
                f"({', '.join(sorted(EXPOSURE_FLAGS))})"
            )
        names.add(name)
    return sorted(names)


def refused_flags(args: Sequence[str], allowed: Collection[str] = ()) -> list[tuple[str, str]]:
    """Every (argument, denied flag it may mean) in `args` that `allowed` does not allow."""
    refused: list[tuple[str, str]] = []
    for arg in args:
        name = flag_name(arg)
        if name is None:
            continue
        for flag in EXPOSURE_FLAGS:
            if flag.startswith(name) and flag not in allowed:
                refused.append((arg, flag))
    return refused


def check_executor_flags(task: UnitTask[Any, Any], allowed: Collection[str] = ()) -> None:
    """Raise `ExecutorFlagError` when the task's config passes a denied executor flag that is not allowed."""
    descriptor = task.descriptor
    refused = refused_flags(descriptor.executor_args(), allowed)
    if not refused:
        return
    arg, flag = refused[0]
    shown = arg if arg.split("=", 1)[0] == flag else f"{arg} (read as {flag})"
    raise ExecutorFlagError(
        f"{task.display_name()}: {type(descriptor).__name__} passes {shown} to its executor, which "
        f"{EXPOSURE_FLAGS[flag]}; remove it, or have an admin allow it with {ALLOW_SETTING}={flag} "
        "(gateway and task managers)",
        flag=flag,
    )


def _not_an_option(value: str) -> str:
    if value.startswith("-"):
        raise ValueError(
            f"{value!r} starts with '-': it would reach the executor's command line as an option, "
            "not a model (use a repository id or a path)"
        )
    return value


ModelId = Annotated[str, Field(min_length=1), AfterValidator(_not_an_option)]
"""A model id as task configs give it: it lands on command lines (`vllm serve MODEL`), so never `-...`."""
