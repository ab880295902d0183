"""Structure rules checked on the source: no import cycles in the task packages, no private imports.

Both walk the source with `ast`, so they see every import: module-level ones and those inside
functions (a function-local import that closes a cycle is still a cycle, only a hidden one).
Imports under `if TYPE_CHECKING:` are not counted: they never run, and exist for annotations only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ROOT / "packages"
TASK_SRC = PACKAGES / "cornserve-task" / "src"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    """Every module of every package: dotted name → file (packages/*/src/...)."""
    found: dict[str, Path] = {}
    for src in sorted(PACKAGES.glob("*/src")):
        for path in sorted(src.rglob("*.py")):
            found[module_name(path, src)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: all of the tree except the bodies of `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from X import ...` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """The known modules `path` imports at run time (`from pkg import mod` counts `pkg.mod`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            target = resolve_from(node, module, is_package)
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
    found.discard(module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def task_import_graph() -> dict[str, set[str]]:
    modules = {
        name: path
        for name, path in source_modules().items()
        if name.split(".")[:2] in (["cornserve", "task"], ["cornserve", "app"])
    }
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def test_task_and_app_have_no_import_cycle() -> None:
    graph = task_import_graph()
    assert {"cornserve.task.base", "cornserve.task.registry", "cornserve.app.loader"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def write_package(root: Path, a: str, b: str) -> tuple[Path, set[str]]:
    """A package `pkg` with modules `a` and `b` under `root`; returns its folder and module names."""
    pkg = root / "pkg"
    pkg.mkdir(exist_ok=True)
    for name, text in (("__init__", ""), ("a", a), ("b", b)):
        (pkg / f"{name}.py").write_text(text)
    return pkg, {"pkg", "pkg.a", "pkg.b"}


def test_the_cycle_finder_sees_function_level_imports(tmp_path: Path) -> None:
    """The check itself can fail: a cycle closed by an import inside a function is found."""
    type_checking_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    pkg, known = write_package(
        tmp_path, "from pkg.b import thing\n", type_checking_only + "def thing():\n    from pkg import a\n"
    )
    graph = {m: imported_modules(pkg / f"{m[4:]}.py", m, known) for m in ("pkg.a", "pkg.b")}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text(type_checking_only)
    graph["pkg.b"] = imported_modules(pkg / "b.py", "pkg.b", known)
    assert find_cycle(graph) is None


# ----- private names ---------------------------------------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_accesses(path: Path, module: str, known: set[str], root: Path = ROOT) -> list[str]:
    """`from X import _name` and `X._name` (X an imported module) that reach into another module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    problems: list[str] = []
    module_aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module_aliases[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
                if any(_private(part) for part in alias.name.split(".")):
                    problems.append(f"{path.relative_to(root)}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            target = resolve_from(node, module, is_package)
            if any(_private(part) for part in target.split(".")):
                problems.append(f"{path.relative_to(root)}:{node.lineno}: from {target} import ...")
                continue
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    module_aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
                if _private(alias.name) and target != module:
                    problems.append(
                        f"{path.relative_to(root)}:{node.lineno}: from {target} import {alias.name}"
                    )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and module_aliases[node.value.id] != module
        ):
            where = module_aliases[node.value.id]
            problems.append(f"{path.relative_to(root)}:{node.lineno}: {where}.{node.attr}")
    return problems


def test_no_module_reaches_into_another_modules_private_names() -> None:
    modules = source_modules()
    known = set(modules)
    problems = [p for name, path in modules.items() for p in private_accesses(path, name, known)]
    assert not problems, "private names used outside their module:\n" + "\n".join(problems)


def test_the_private_name_check_can_fail(tmp_path: Path) -> None:
    pkg, known = write_package(
        tmp_path,
        "_hidden = 1\n",
        "from pkg.a import _hidden\nfrom pkg import a\nimport json\nx = a._hidden + json._default_decoder is None\n",
    )
    found = [p.split(": ", 1)[1] for p in private_accesses(pkg / "b.py", "pkg.b", known, tmp_path)]
    assert found == ["from pkg.a import _hidden", "pkg.a._hidden", "json._default_decoder"]
