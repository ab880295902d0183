#!/usr/bin/env bash
# Run the sidecar's GPU tests (CUDA IPC between processes, NCCL pairwise communicator) on a machine
# with a CUDA GPU. Installs the `gpu` extra (CuPy) into the venv first. Exits non-zero when no GPU
# is visible, so a silent "all skipped" is never mistaken for a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
uv sync --locked --extra gpu --package cornserve-sidecar --inexact >/dev/null 2>&1 || uv pip install "cupy-cuda12x>=13"
uv run python - <<'PY'
from cornserve.sidecar.gpu import gpu_available
import sys, torch
print("torch.cuda.is_available:", torch.cuda.is_available(), "| cupy+device:", gpu_available())
sys.exit(0 if gpu_available() and torch.cuda.is_available() else 3)
PY
uv run pytest tests/sidecar/test_gpu.py -m gpu -v -rs -p no:cacheprovider
