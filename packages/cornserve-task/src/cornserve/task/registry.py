"""Registries of unit task and descriptor classes, and task (de)serialization.

Deployment step 1 of the spec: a unit task instance is serialized as its registered class name
plus its JSON configuration, sent to other services, and rebuilt there from the same registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cornserve.task.errors import TaskRegistryError, TaskSerializationError

if TYPE_CHECKING:
    from cornserve.task.base import UnitTask
    from cornserve.task.descriptor import TaskExecutionDescriptor

logger = logging.getLogger(__name__)

_UNIT_TASKS: dict[str, type[UnitTask[Any, Any]]] = {}
_DESCRIPTORS: dict[str, type[TaskExecutionDescriptor[Any]]] = {}


def _register(table: dict[str, Any], kind: str, cls: type) -> None:
    """Register under the class name; a later class of the same name replaces the earlier one.

    Replacement is what re-uploading a task library (or re-running a notebook cell) needs; a
    different class taking over a name is logged, because deserialization will now build it.
    """
    name = cls.__name__
    existing = table.get(name)
    if existing is not None and existing is not cls:
        same = existing.__module__ == cls.__module__ and existing.__qualname__ == cls.__qualname__
        if not same:
            logger.warning(
                "%s class %r is now %s.%s (was %s.%s)",
                kind, name, cls.__module__, cls.__qualname__, existing.__module__, existing.__qualname__,
            )  # fmt: skip
    table[name] = cls


def register_unit_task(cls: type[UnitTask[Any, Any]]) -> None:
    """Register a concrete unit task class under its class name (done automatically on definition)."""
    _register(_UNIT_TASKS, "unit task", cls)


def register_descriptor(cls: type[TaskExecutionDescriptor[Any]]) -> None:
    """Register a concrete descriptor class under its class name (done automatically on definition)."""
    _register(_DESCRIPTORS, "descriptor", cls)


def _ensure_builtins() -> None:
    import cornserve.task.builtins  # noqa: F401  (registers the built-in classes)


def unit_task_class(name: str) -> type[UnitTask[Any, Any]]:
    """Look up a registered unit task class by name."""
    _ensure_builtins()
    try:
        return _UNIT_TASKS[name]
    except KeyError:
        known = ", ".join(sorted(_UNIT_TASKS)) or "none"
        raise TaskRegistryError(
            f"unknown unit task {name!r}; registered unit tasks: {known}. Custom tasks must be "
            "registered (imported, or uploaded as a task library) before use"
        ) from None


def descriptor_class(name: str) -> type[TaskExecutionDescriptor[Any]]:
    """Look up a registered descriptor class by name."""
    _ensure_builtins()
    try:
        return _DESCRIPTORS[name]
    except KeyError:
        known = ", ".join(sorted(_DESCRIPTORS)) or "none"
        raise TaskRegistryError(
            f"unknown execution descriptor {name!r}; registered descriptors: {known}"
        ) from None


def registered_unit_tasks() -> dict[str, type[UnitTask[Any, Any]]]:
    """A snapshot of the unit task registry (name → class)."""
    _ensure_builtins()
    return dict(_UNIT_TASKS)


def registered_descriptors() -> dict[str, type[TaskExecutionDescriptor[Any]]]:
    """A snapshot of the descriptor registry (name → class)."""
    _ensure_builtins()
    return dict(_DESCRIPTORS)


def serialize_task(task: UnitTask[Any, Any]) -> dict[str, Any]:
    """`{"name": <registered class name>, "config": <JSON-able dict>}` for a unit task instance."""
    from cornserve.task.base import UnitTask

    if not isinstance(task, UnitTask):
        raise TaskSerializationError(
            f"only unit tasks are deployed and serialized; {type(task).__name__} is a composite task "
            "(use discover_unit_tasks() to find its unit tasks)"
        )
    name = type(task).__name__
    if _UNIT_TASKS.get(name) is not type(task):
        raise TaskRegistryError(f"{type(task).__qualname__} is not the registered unit task named {name!r}")
    return {"name": name, "config": task.model_dump(mode="json")}


def deserialize_task(data: dict[str, Any]) -> UnitTask[Any, Any]:
    """Rebuild a unit task from `serialize_task`'s output."""
    if not isinstance(data, dict) or set(data) != {"name", "config"}:
        raise TaskSerializationError(
            'a serialized task is {"name": str, "config": dict}, got ' + repr(data)[:200]
        )
    name, config = data["name"], data["config"]
    if not isinstance(name, str) or not isinstance(config, dict):
        raise TaskSerializationError('a serialized task is {"name": str, "config": dict}')
    cls = unit_task_class(name)
    try:
        return cls.model_validate(config)
    except ValidationError as exc:
        raise TaskSerializationError(f"invalid configuration for {name}: {exc}") from exc


def task_deployment_key(task: UnitTask[Any, Any]) -> str:
    """A stable, subject-safe key: equal exactly when class, descriptor and configuration are equal."""
    data = serialize_task(task)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    return f"{data['name'].lower()}-{digest}"
