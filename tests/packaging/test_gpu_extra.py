"""The sidecar's `gpu` extra installs the CuPy build of the same CUDA major as the locked torch."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cupy_of_the_gpu_extra_matches_the_cuda_major_of_the_locked_torch() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = lock["package"]
    runtimes = {
        p["version"].split(".")[0]
        for p in packages
        if p["name"] == "nvidia-cuda-runtime" or p["name"].startswith("nvidia-cuda-runtime-cu")
    }
    torch_cuda = {
        dep.get("version", "").split(".")[0]
        for p in packages
        if p["name"] == "torch"
        for dep in p.get("dependencies", [])
        if dep["name"] == "nvidia-cuda-runtime"
    } - {""}
    majors = torch_cuda or runtimes
    assert majors, "no CUDA runtime locked for torch"
    sidecar = tomllib.loads((ROOT / "packages/cornserve-sidecar/pyproject.toml").read_text())
    gpu = sidecar["project"]["optional-dependencies"]["gpu"]
    cupy = [re.match(r"cupy-cuda(\d+)x", d) for d in gpu]
    found = {m.group(1) for m in cupy if m}
    assert found == majors, f"gpu extra CuPy for CUDA {found}, locked torch built for CUDA {majors}"
    assert any(p["name"] == f"cupy-cuda{m}x" for p in packages for m in majors)
