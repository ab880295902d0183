"""Registries of unit task and descriptor classes, and task (de)serialization.

Deployment step 1 of the spec: a unit task instance is serialized as its registered class name
plus its JSON configuration, sent to other services, and rebuilt there from the same registry.

A class is registered under `(library, qualified name)`: the library is the task library that
defined it (stable across versions of that library) or, for classes shipped in Python packages and
test modules, the defining module. The wire name is `"<library>:<qualname>"`, so two classes that
share a `__name__` in different modules never collide.

A leaf of `cornserve.task` (it imports only `errors`): the task and descriptor base classes
register their concrete subclasses here when they are defined; the built-in ones are registered
by `cornserve.task.builtins.register_builtins()`, which `cornserve.task` calls on import. A lookup
never imports anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import ValidationError

from cornserve.task.errors import TaskRegistryError, TaskSerializationError

if TYPE_CHECKING:
    from cornserve.task.base import UnitTask
    from cornserve.task.descriptor import TaskExecutionDescriptor

logger = logging.getLogger(__name__)

TASKLIB_MARKER = "__cornserve_tasklib__"
"""A module-level name every task library module defines: the library's name."""

ClassT = TypeVar("ClassT", bound=type)


@dataclass(frozen=True, order=True)
class ClassKey:
    """What a registered class is known by: its library and its qualified name."""

    library: str
    qualname: str

    @classmethod
    def of(cls, klass: type) -> ClassKey:
        """The key of a class: task library name (or module name) and `__qualname__`."""
        module = sys.modules.get(klass.__module__)
        library = getattr(module, TASKLIB_MARKER, None) if module is not None else None
        return cls(
            library=library if isinstance(library, str) else klass.__module__, qualname=klass.__qualname__
        )

    @classmethod
    def parse(cls, ref: str) -> ClassKey:
        """`"library:qualname"` → key; a ref without a library is refused as unknown by the lookup."""
        library, sep, qualname = ref.rpartition(":")
        return cls(library=library if sep else "", qualname=qualname)

    @property
    def ref(self) -> str:
        """The wire name: `"library:qualname"`."""
        return f"{self.library}:{self.qualname}"


class ClassRegistry(Generic[ClassT]):
    """Classes of one kind by `ClassKey`.

    A class defined again under the same key replaces the earlier one: a new version of a task
    library, an app's source loaded again, a module reloaded in place, or a notebook cell run again
    (Python itself rebinds the name). The true collision is a class defined inside a function that
    runs twice in the same module object: both versions stay alive under one `<locals>` name, and
    deserialization could not know which one is meant, so it is refused.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[ClassKey, ClassT] = {}
        self._modules: dict[ClassKey, object] = {}
        """The module object each class was defined in, told apart from a re-executed namesake."""
        self.generation = 0
        """Bumped by every registration: what was rebuilt from an older generation may name a replaced class."""

    def register(self, klass: ClassT) -> ClassKey:
        """Register `klass` under its key; raise TaskRegistryError on a true collision."""
        key = ClassKey.of(klass)
        module = sys.modules.get(klass.__module__)
        existing = self._classes.get(key)
        if existing is not None and existing is not klass:
            defined_in_a_function = "<locals>" in klass.__qualname__
            if defined_in_a_function and module is not None and self._modules.get(key) is module:
                raise TaskRegistryError(
                    f"two different {self.kind} classes are named {key.ref}: module {klass.__module__} "
                    f"defines {klass.__qualname__} twice. Give each class its own name (a class defined "
                    "inside a function is a new class of the same name on every call: define it once)"
                )
            logger.info("%s %s is replaced by a new version from %s", self.kind, key.ref, klass.__module__)
        self._classes[key] = klass
        self._modules[key] = module
        self.generation += 1
        return key

    def key_of(self, klass: type) -> ClassKey | None:
        """The key `klass` is registered under, or None when it is not (or no longer) registered."""
        key = ClassKey.of(klass)
        return key if self._classes.get(key) is klass else None

    def lookup(self, key: ClassKey) -> ClassT:
        """The class registered under `key`; TaskRegistryError naming the known ones otherwise."""
        try:
            return self._classes[key]
        except KeyError:
            known = ", ".join(sorted(k.ref for k in self._classes)) or "none"
            raise TaskRegistryError(
                f"unknown {self.kind} {key.ref if key.library else key.qualname!r}; registered: {known}. "
                "Custom classes must be registered (imported, or uploaded as a task library) before use"
            ) from None

    def snapshot(self) -> dict[str, ClassT]:
        """Wire name → class, for every registered class."""
        return {key.ref: klass for key, klass in sorted(self._classes.items())}


UNIT_TASKS: ClassRegistry[type[UnitTask[Any, Any]]] = ClassRegistry("unit task")
DESCRIPTORS: ClassRegistry[type[TaskExecutionDescriptor[Any]]] = ClassRegistry("execution descriptor")


def registered_unit_tasks() -> dict[str, type[UnitTask[Any, Any]]]:
    """A snapshot of the unit task registry (`"library:qualname"` → class)."""
    return UNIT_TASKS.snapshot()


def registered_descriptors() -> dict[str, type[TaskExecutionDescriptor[Any]]]:
    """A snapshot of the descriptor registry (`"library:qualname"` → class)."""
    return DESCRIPTORS.snapshot()


def serialize_task(task: UnitTask[Any, Any]) -> dict[str, Any]:
    """`{"name": "<library>:<qualname>", "config": <JSON-able dict>}` for a unit task instance."""
    key = UNIT_TASKS.key_of(type(task))
    if key is None:
        raise TaskSerializationError(
            f"{type(task).__qualname__} is not a registered unit task: only unit tasks are deployed and "
            "serialized, not a composite task (use discover_unit_tasks() to find its unit tasks), and a "
            "unit task class replaced by a newer version can no longer be serialized"
        )
    return {"name": key.ref, "config": task.model_dump(mode="json")}


def deserialize_task(data: dict[str, Any]) -> UnitTask[Any, Any]:
    """Rebuild a unit task from `serialize_task`'s output."""
    if not isinstance(data, dict) or set(data) != {"name", "config"}:
        raise TaskSerializationError(
            'a serialized task is {"name": str, "config": dict}, got ' + repr(data)[:200]
        )
    name, config = data["name"], data["config"]
    if not isinstance(name, str) or not isinstance(config, dict):
        raise TaskSerializationError('a serialized task is {"name": str, "config": dict}')
    cls = UNIT_TASKS.lookup(ClassKey.parse(name))
    try:
        return cls.model_validate(config)
    except ValidationError as exc:
        raise TaskSerializationError(f"invalid configuration for {name}: {exc}") from exc


SHARED_TASKS_MAX = 512
"""Distinct wire forms `deserialize_shared_task` keeps rebuilt (a graph uses a handful of tasks)."""

_shared_tasks: dict[str, UnitTask[Any, Any]] = {}
_shared_generation: tuple[int, int] = (0, 0)


def deserialize_shared_task(data: dict[str, Any]) -> UnitTask[Any, Any]:
    """`deserialize_task`, rebuilding each distinct wire form once and returning that instance again.

    For the per-invocation paths (every hop of every graph parses its invocations' tasks): a task
    is a frozen pydantic model (its fields are its whole configuration), so one instance serves
    every invocation with the same wire form, and rebuilding it (validating the configuration and
    the descriptor, then hashing the deployment key) was ~12% of a dispatcher's and ~25% of a
    Python executor's CPU per request. The key is the wire form's JSON text; any registration
    (a task library loaded or replaced) empties the cache, so a replaced class is never handed out.
    Errors are never cached: a wire form that fails is rebuilt (and fails) every time.
    """
    global _shared_generation
    generation = (UNIT_TASKS.generation, DESCRIPTORS.generation)
    if generation != _shared_generation:
        _shared_tasks.clear()
        _shared_generation = generation
    try:
        key = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):  # not plain JSON: rebuilt (and judged) as usual, never cached
        return deserialize_task(data)
    task = _shared_tasks.get(key)
    if task is None:
        task = deserialize_task(data)
        if len(_shared_tasks) >= SHARED_TASKS_MAX:
            del _shared_tasks[next(iter(_shared_tasks))]  # the oldest entry
        _shared_tasks[key] = task
    return task


_UNSAFE = re.compile(r"[^a-z0-9_]+")


def task_deployment_key(task: UnitTask[Any, Any]) -> str:
    """A stable, subject-safe key: equal exactly when class, descriptor and configuration are equal."""
    data = serialize_task(task)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    readable = _UNSAFE.sub("_", type(task).__qualname__.lower()).strip("_")
    return f"{readable}-{digest}"
