#!/usr/bin/env bash
# The one prepared GPU call (DESIGN §6): every Triton kernel is checked against its reference on the GPU
# (benchmarks/kernels.py refuses to time an implementation whose loss or gradient disagrees), then timed.
# Usage on the device machine:  bash benchmarks/device_check.sh   (results under $OUT, default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Pure-Python packages the device image lacks travel as wheels in .whl/ (see the device tool's README).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/kernels.py --device cuda --batch 64 128 256 --dim 65536 --local-crops 10 \
  --json "$OUT/kernels_cuda.json" 2>&1 | tee "$OUT/kernels_cuda.log"
