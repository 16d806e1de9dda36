#!/usr/bin/env bash
# One prepared run for a lent GPU machine (torch and triton preinstalled, no network): build the
# CUDA extension, run the whole test suite (the GPU tier included), then the benchmark harness.
# Logs and the harness's JSON/PNG go to $OUT (default: benchmarks/results).
# Packages the machine lacks (diffusers, open_clip_torch, ...) travel as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
TURBO_KERNELS_BUILD_CUDA=1 MAX_JOBS="$(nproc)" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
python3 -m pytest -q -rs tests 2>&1 | tee "$OUT/tests.log"
python3 -m benchmarks --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
