#!/usr/bin/env bash
# Prepare the offline GPU check: run HERE (a machine with network), carry bench/gpu-wheels/ to the
# GPU machine with the working tree, then run bench/gpu_check.sh there (it has no network).
#
# bench/gpu-wheels/ (git-ignored) gets:
#   - every workspace package built as a wheel (`uv build --all-packages`),
#   - the third-party wheels the check needs that the GPU machine lacks, pinned to uv.lock
#     (bench/gpu_wheels.py computes the list; torch, CuPy, transformers, aiohttp, torchvision,
#     Pillow and what they pull in are preinstalled there and left out), for CPython 3.12
#     manylinux x86_64.
# Fails if the folder exceeds 64 MiB (what the GPU machine takes carried in).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/gpu-wheels
PYVER=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=64

rm -rf "$OUT"
mkdir -p "$OUT"
python3 -m uv build --all-packages --wheel --out-dir "$OUT" -q
python3 bench/gpu_wheels.py --with-wheels >"$OUT/requirements.txt"
python3 bench/gpu_wheels.py --sdist-only >"$OUT/build-requirements.txt"
platform=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platform[@]}" --dest "$OUT" -r "$OUT/requirements.txt"
# Source-only packages (nkeys): pure Python, built into wheels here.
if [ -s "$OUT/build-requirements.txt" ]; then
    python3 -m pip wheel -q --no-deps --wheel-dir "$OUT" -r "$OUT/build-requirements.txt"
fi

size_kib=$(du -sk "$OUT" | cut -f1)
echo "gpu_prepare: $(ls "$OUT"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB in $OUT"
if ((size_kib > LIMIT_MIB * 1024)); then
    echo "gpu_prepare: $OUT is over $LIMIT_MIB MiB; the GPU machine cannot take it" >&2
    du -k "$OUT"/*.whl | sort -n | tail -5 >&2
    exit 1
fi
