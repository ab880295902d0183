"""Which third-party wheels the offline GPU check needs: read from uv.lock, nothing guessed.

usage: python bench/gpu_wheels.py [--sdist-only | --with-wheels]  ->  prints `name==version` lines
       (--sdist-only: those the lock knows only as source archives, to be built as wheels;
        --with-wheels: the others, to be downloaded)

Needed: the dependency closure (from the lock) of every workspace package the check runs, the
sidecar's `client` extra, the CLI's `models` extra and the test runner (pytest and its plugins).
Left out: what the GPU machine has preinstalled (see PREINSTALLED) and everything those pull in,
so the wheelhouse stays small; installed with the system site-packages visible, pip takes those
from the machine.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREINSTALLED = ["torch", "cupy-cuda13x", "transformers", "aiohttp", "torchvision", "pillow"]
"""On the GPU machine already, never carried: the four issue 17 names, and torchvision 0.26 (the
one that pairs with its torch 2.11; the lock's pins the lock's torch exactly) and Pillow, both in
that machine's image and 7 MiB each. Their dependencies are left out too; small wheels the machine
may hold in another version (pytest, pydantic, ...) are carried: pip keeps whichever satisfies."""
ALWAYS_CARRY = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"}
"""Needed and small; carried even when the lock's transformers pulls them in: the GPU machine's
image has no pydantic (issue 17 names it among the wheels that must travel)."""
TEST_TOOLS = ["pytest", "pytest-asyncio", "pytest-timeout"]
WORKSPACE_EXTRAS = {"cornserve-sidecar": ["client"], "cornserve-cli": ["models"]}
SKIP_EXTRAS = {"vllm", "gpu"}
"""vLLM is not installed there (the real `vllm serve` run is a manual step); CuPy is preinstalled."""


def _newest(packages: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """One entry per name: the newest version (the lock forks numpy/torch for the vllm extra)."""
    best: dict[str, dict[str, object]] = {}
    for p in packages:
        name = str(p["name"])
        if name not in best or _key(str(p["version"])) > _key(str(best[name]["version"])):
            best[name] = p
    return best


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) if x.isdigit() else 0 for x in version.replace("+", ".").split("."))


def _platform_ok(dep: dict[str, object]) -> bool:
    marker = str(dep.get("marker", ""))
    return not any(bad in marker for bad in ("sys_platform == 'win32'", "sys_platform == 'darwin'"))


def closure(
    by_name: dict[str, dict[str, object]], roots: list[str], extras: dict[str, list[str]]
) -> set[str]:
    """Names reachable from ``roots`` (with ``extras`` of named packages), markers for other OSes skipped."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        p = by_name[name]
        deps = list(p.get("dependencies", []))  # type: ignore[call-overload]
        optional = p.get("optional-dependencies", {})
        assert isinstance(optional, dict)
        for extra in extras.get(name, []):
            deps += optional.get(extra, [])
        for dep in deps:
            if _platform_ok(dep):
                dep_name = str(dep["name"])
                todo.append(dep_name)
                for extra in dep.get("extra", []):
                    if extra not in SKIP_EXTRAS and extra not in extras.get(dep_name, []):
                        extras.setdefault(dep_name, []).append(extra)
                        seen.discard(dep_name)  # walk it again, with the extra's dependencies
    return seen


def main() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    by_name = _newest(lock["package"])
    workspace = sorted(n for n, p in by_name.items() if "editable" in str(p.get("source", "")))
    needed = closure(by_name, workspace + TEST_TOOLS, {k: list(v) for k, v in WORKSPACE_EXTRAS.items()})
    there = closure(by_name, PREINSTALLED, {})
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    for name in sorted((needed - there - set(workspace)) | (needed & ALWAYS_CARRY)):
        sdist_only = not by_name[name].get("wheels")
        if (mode == "--sdist-only" and not sdist_only) or (mode == "--with-wheels" and sdist_only):
            continue
        print(f"{name}=={by_name[name]['version']}")
    print(f"# {len(workspace)} workspace packages are built as wheels separately", file=sys.stderr)


if __name__ == "__main__":
    main()
