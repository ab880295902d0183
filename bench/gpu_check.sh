#!/usr/bin/env bash
# The offline GPU proof of issue 17 (CUDA IPC, NCCL, Eric and the LLM executor with a GPU): one
# table, in under 10 minutes, on a GPU machine WITHOUT network.
#
#   1. here, with network:   bench/gpu_prepare.sh   (wheels into bench/gpu-wheels/, < 64 MiB)
#   2. carry the working tree and bench/gpu-wheels/ to the GPU machine, then there:
#                            bench/gpu_check.sh
#
# The GPU machine provides Python 3.12 with torch (CUDA 13), CuPy 14 (cupy-cuda13x), transformers,
# aiohttp, torchvision and Pillow; everything else comes from bench/gpu-wheels/ (pip --no-index) into
# a venv that sees the machine's own packages. Exit 0: every row passed; 1: a row failed; 3: no CUDA
# (or no CuPy, or no wheels): nothing was checked. GPU_CHECK_PYTHON picks the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=bench/gpu-wheels
VENV=${GPU_CHECK_VENV:-/tmp/cornserve-gpu-check-venv}
OUT=${GPU_CHECK_OUT:-/tmp/cornserve-gpu-check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}

"$PY" bench/gpu_check.py preflight || exit 3
if [ ! -f "$WHEELS/requirements.txt" ]; then
    echo "gpu_check: $WHEELS/ is missing: run bench/gpu_prepare.sh on a machine with network and carry it" >&2
    exit 3
fi
rm -rf "$VENV"
"$PY" -m venv --without-pip --system-site-packages "$VENV"
# The machine's python3 may itself be a venv, whose packages a nested venv does not count as
# "system" ones: add every site-packages directory of $PY (with its .pth files) after the venv's own.
"$PY" -c 'import site; print("".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))' \
    >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_gpu_check_parent.pth"
mapfile -t ours < <(ls "$WHEELS" | sed -n 's/^\(cornserve_[a-z_]*\)-.*\.whl$/\1/p' | tr _ -)
# $PY's pip installs into the venv (`--python`): it sees the machine's torch, CuPy, ... as installed.
"$PY" -m pip --python "$VENV/bin/python" install -q --no-index --no-cache-dir --find-links "$WHEELS" \
    "${ours[@]}" "cornserve-sidecar[client]" "cornserve-cli[models]" pytest pytest-asyncio pytest-timeout
exec "$VENV/bin/python" bench/gpu_check.py run --budget "$BUDGET_S" --out "$OUT"
