#!/usr/bin/env bash
# One GPU call (device tool): install carried wheels, build, check every backend on CUDA, time everything
# (the fire-first edit of every backend at 0/5/100 % of tokens firing, beside the cuBLAS GEMM).
# Usage on the device machine, from the repo root, with .whl/ carried (diffusers, transformers, ... wheels):
#   bash benchmarks/gpu_session.sh            # results and logs land in $OUT (or ./gpu_out)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/build.log"
import time, torch
from saeuron import ops
t = time.time(); print(ops.status()); print(f"backend selection + JIT build: {time.time() - t:.1f}s")
PY
python3 -m pytest tests/test_gpu.py tests/test_edit_fire_first.py tests/test_kernels_triton.py tests/test_ops_reference.py \
  tests/test_ops_validation.py tests/test_ext.py::test_sources_and_supports \
  -q -x -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.log" | tail -5
python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/bench.json" \
  2>&1 | tee "$OUT/bench.log" | grep -E '^\||passed|failed'
