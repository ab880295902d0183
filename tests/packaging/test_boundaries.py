"""Package boundaries: no service imports another service, and the contract packages import no service.

Services talk over the bus (`cornserve.bus`) and share the task abstraction (`cornserve.task`) and
the runtime (`cornserve.runtime`); importing another service's package would tie their releases
and their processes together. The check walks every import statement (module level and inside
functions) with `ast`, so a lazy import cannot slip through.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGES = Path(__file__).resolve().parents[2] / "packages"

SERVICES = {
    "cornserve-gateway": "cornserve.gateway",
    "cornserve-resource-manager": "cornserve.resource_manager",
    "cornserve-task-manager": "cornserve.task_manager",
    "cornserve-dispatcher": "cornserve.dispatcher",
    "cornserve-sidecar": "cornserve.sidecar",
    "cornserve-executor": "cornserve.executor",
    "cornserve-eric": "cornserve.eric",
    "cornserve-llm-executor": "cornserve.llm_executor",
    "cornserve-vllm": "cornserve.vllm",
}
"""Each service or executor package and its module. The sidecar *client* is a library executors use."""

SIDECAR_CLIENT_USERS = {"cornserve-executor", "cornserve-eric", "cornserve-llm-executor", "cornserve-vllm"}
"""Executors send and receive tensors through `cornserve.sidecar`'s client: the one allowed crossing."""

CONTRACT = {
    "cornserve-task": "cornserve.task",
    "cornserve-bus": "cornserve.bus",
    "cornserve-runtime": "cornserve.runtime",
}
"""Packages every service may use; they must import no service (nor, for runtime, the bus)."""


def imported_modules(package_dir: Path) -> list[tuple[Path, int, str]]:
    """Every module named by an import statement in the package's sources, with where it stands."""
    found: list[tuple[Path, int, str]] = []
    for path in sorted((package_dir / "src").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.extend((path, node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.extend((path, node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def offending(package: str, forbidden: list[str]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGES)}:{line}: imports {name}"
        for path, line, name in imported_modules(PACKAGES / package)
        if any(name == mod or name.startswith(mod + ".") for mod in forbidden)
    ]


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_no_service_imports_another_service(package: str) -> None:
    others = [mod for name, mod in SERVICES.items() if name != package]
    if package in SIDECAR_CLIENT_USERS:
        others.remove("cornserve.sidecar")
    assert offending(package, others) == []


@pytest.mark.parametrize("package", sorted(CONTRACT))
def test_contract_packages_import_no_service(package: str) -> None:
    forbidden = list(SERVICES.values())
    if package == "cornserve-runtime":
        forbidden += ["cornserve.bus", "cornserve.task"]
    assert offending(package, forbidden) == []


def test_the_scan_sees_function_level_imports(tmp_path: Path) -> None:
    """The walker finds an import hidden inside a function (what a lazy cross-service import looks like)."""
    src = tmp_path / "pkg" / "src" / "cornserve" / "x"
    src.mkdir(parents=True)
    (src / "m.py").write_text(
        "def f():\n    from cornserve.gateway.routes import Gateway\n    return Gateway\n"
    )
    names = [name for _, _, name in imported_modules(tmp_path / "pkg")]
    assert names == ["cornserve.gateway.routes.Gateway"]
