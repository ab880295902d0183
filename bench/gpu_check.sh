#!/usr/bin/env bash
# Run the sidecar's GPU tests on a machine with CUDA GPUs:
#   - CUDA IPC between two processes on one node (needs 1 GPU)
#   - NCCL pairwise communicator with the unique id exchanged over NATS, and a CUDA tensor sent
#     across two node ids through the sidecar API (need 2 GPUs: NCCL wants one device per rank)
# Installs the sidecar's `gpu` extra (CuPy) into the venv first, and exits non-zero when no GPU is
# visible so that "everything skipped" is never mistaken for a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
uv sync --locked --all-extras --inexact || uv pip install "cupy-cuda12x>=13"
uv run python - <<'PY'
import sys

import torch

from cornserve.sidecar.gpu import gpu_available

print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      "devices:", torch.cuda.device_count(), "| cupy + device:", gpu_available())
sys.exit(0 if gpu_available() and torch.cuda.is_available() else 3)
PY
uv run pytest tests/sidecar/test_gpu.py -m gpu -v -rs -p no:cacheprovider "$@"
