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
