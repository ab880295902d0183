"""The class an app subclasses to declare the tasks it uses."""

from __future__ import annotations

from typing import Any, ClassVar

from cornserve.task.base import Task


class AppConfig:
    """Subclass it as `class Config(AppConfig)` and set `tasks = {"name": task, ...}`.

    Every unit task reachable from these tasks is deployed when the app is registered, and shared
    with other apps that use an equivalent task.
    """

    tasks: ClassVar[dict[str, Task[Any, Any]]] = {}
    max_concurrency: ClassVar[int | None] = None
    """Invocations of this app running at once (streams until they end); None: the gateway's
    `--app-max-concurrency`. 0 turns the app off: every invocation is answered 503 `no_capacity`."""
    max_queue: ClassVar[int | None] = None
    """Invocations waiting for a running slot; beyond, 429 `overloaded`. None: `--app-max-queue`."""
    openai_chat: ClassVar[bool] = False
    """True: the app speaks OpenAI chat completions, and the gateway serves it at
    `POST /v1/chat/completions` (with `model` = the app's name or an alias) besides its own invoke
    route. `serve` must then take a `ChatCompletionRequest` (or a subclass) and stream
    `ChatCompletionChunk`s or return one `ChatCompletion`; the gateway turns either into what the
    caller asked for (a stream or one completion), so the app need not look at `stream`."""
    openai_aliases: ClassVar[tuple[str, ...]] = ()
    """More `model` names the app answers to on `/v1/chat/completions` (e.g. the model it wraps);
    two apps cannot share one."""
