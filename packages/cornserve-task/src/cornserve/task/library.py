"""Task libraries: user unit task and descriptor classes uploaded as Python source.

Registration (spec: "Task Lifecycle") makes a unit task class known to every service. A task
library is one Python source file; loading it executes it in a fresh module, and the classes it
defines register themselves under (library name, qualified name). Loading the same source twice
is a no-op; a new version of a library re-registers its classes (its classes replace the earlier
version's under the same keys).

Trust model: loading a library runs its code with the privileges of the loading process, in every
service. Only people who may run code on the cluster may upload task libraries.
"""

from __future__ import annotations

import hashlib
import re
import sys
import types
from dataclasses import dataclass
from typing import Any

from cornserve.task.errors import TaskDefinitionError
from cornserve.task.registry import DESCRIPTORS, TASKLIB_MARKER, UNIT_TASKS, ClassRegistry

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_loaded: dict[str, tuple[str, types.ModuleType]] = {}
"""Library name -> (sha256 of its source, module)."""


@dataclass(frozen=True)
class LoadedLibrary:
    """What loading a task library defined."""

    name: str
    sha256: str
    module: types.ModuleType
    unit_tasks: list[str]
    descriptors: list[str]


def library_sha256(source: str) -> str:
    """The content hash that versions a library."""
    return hashlib.sha256(source.encode()).hexdigest()


def check_library_name(name: str) -> str:
    """Library names: lowercase letters, digits, '-' and '_', starting with a letter, at most 64."""
    if not _NAME.match(name):
        raise TaskDefinitionError(
            f"invalid task library name {name!r}: use lowercase letters, digits, '-' and '_', starting with a letter"
        )
    return name


def module_name_for(name: str, sha256: str) -> str:
    """The module a library version is loaded as (its classes' __module__)."""
    return f"cornserve_tasklib_{name.replace('-', '_')}_{sha256[:12]}"


def load_task_library(name: str, source: str) -> LoadedLibrary:
    """Execute a library's source (once per version) and report the classes it registered."""
    check_library_name(name)
    sha = library_sha256(source)
    current = _loaded.get(name)
    if current is not None and current[0] == sha:
        module = current[1]
    else:
        module_name = module_name_for(name, sha)
        module = types.ModuleType(module_name)
        module.__file__ = f"<task library {name}>"
        module.__dict__[TASKLIB_MARKER] = name
        sys.modules[module_name] = module
        try:
            exec(compile(source, module.__file__, "exec"), module.__dict__)
        except (Exception, SystemExit) as exc:  # a stray sys.exit() fails the library, not the service
            sys.modules.pop(module_name, None)
            raise TaskDefinitionError(
                f"task library {name!r} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        _loaded[name] = (sha, module)
        _expose(name, module)
    return LoadedLibrary(
        name=name,
        sha256=sha,
        module=module,
        unit_tasks=_defined_in(UNIT_TASKS, module),
        descriptors=_defined_in(DESCRIPTORS, module),
    )


def _defined_in(registry: ClassRegistry[Any], module: types.ModuleType) -> list[str]:
    """Qualified names of the registered classes `module` defines."""
    return sorted(
        cls.__qualname__ for cls in registry.snapshot().values() if cls.__module__ == module.__name__
    )


IMPORT_ROOT = "cornserve_tasklibs"
"""Apps import library classes as `from cornserve_tasklibs.<name> import MyTask` ('-' becomes '_')."""


def _expose(name: str, module: types.ModuleType) -> None:
    """Make the newest version of a library importable under a stable name."""
    root = sys.modules.get(IMPORT_ROOT)
    if root is None:
        root = types.ModuleType(IMPORT_ROOT)
        root.__path__ = []  # a package, so submodules can be imported from it
        sys.modules[IMPORT_ROOT] = root
    attr = name.replace("-", "_")
    sys.modules[f"{IMPORT_ROOT}.{attr}"] = module
    setattr(root, attr, module)


def loaded_libraries() -> dict[str, str]:
    """Library name -> sha256 of the version loaded in this process."""
    return {name: sha for name, (sha, _) in _loaded.items()}
