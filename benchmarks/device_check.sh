#!/usr/bin/env bash
# The one prepared GPU call (DESIGN §6). In order, each step logged to $OUT and none stopping the others:
#   1. the GPU, driver, torch and Triton versions;
#   2. the Triton kernels compiled for the GPU against the float64 literal loss and torch.lerp (the interpreter
#      checks of tests/test_kernels_triton_interpret.py, run on cuda tensors: odd K, B = 1, 2+10 crops, both
#      pairings, fp32/bf16/fp16, strided layouts, mixed-dtype EMA groups), and the fused loss kernels
#      (loss.fused_terms, loss.fused_head's student side) against their float64 literals, fused_terms' forward and
#      backward captured in a CUDA graph and replayed (tests/test_kernels_fused_terms.py and
#      tests/test_kernels_fused_head.py, run on cuda tensors);
#   3. the kernel microbenchmarks at K = 65536, 2+10 crops, B 64/128/256, in bf16 (with the EMA) and in fp32, and
#      the loss block of one head (its last layer + L_sm + L_cm, forward and backward: per-term path, fused_terms,
#      fused_head) in fp32 (benchmarks/kernels.py refuses to time an implementation whose loss or gradient
#      disagrees with the reference);
#   4. the pair-throughput profiler, synthetic crops on the device, 3 warm-up + 5 timed steps, in two passes so
#      that a slow compilation cannot cost the comparison: first baseline and fast without torch.compile
#      (R101-ViT-B at 128, then 64), then fast with torch.compile (R101-ViT-B at 128). Each pass has its own
#      JSON and log, a time budget and a hard timeout. (2026-11-28, H200: one pass of baseline + compiled fast for
#      R101-ViT-B and R50-ViT-S did not finish the first group in 280 s: compiling both models of the pair takes
#      minutes, and a group's JSON is written only when the whole group is done.)
#   5. data.augment=device: decode + parameter draws (one CPU thread) and the device stage on the GPU for 2 x 224 +
#      10 x 96 crops of generated ImageNet-sized JPEGs, batches of 64, and the GPU's crops against the CPU's for 4
#      images (benchmarks/augmentation.py; about a minute).
# Usage on the device machine:  bash benchmarks/device_check.sh [all|kernels|throughput|augmentation]   (results under $OUT,
# default benchmarks/results; a section name runs that section alone)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Pure-Python packages the device image lacks travel as wheels in .whl/ (see the device tool's README).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=()
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember a failure and go on
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log" || failed+=("$name")
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  date -u +%Y-%m-%dT%H:%M:%SZ; } 2>&1 | tee "$OUT/gpu.txt"

section=${1:-all}
checks() {
  for group in dino_fp32 dino_bf16 dino_fp16 dino_layouts ema; do
    python3 tests/test_kernels_triton_interpret.py "$group" cuda || return 1
  done
  python3 tests/test_kernels_fused_terms.py cuda && python3 tests/test_kernels_fused_head.py cuda
}
if [[ $section == all || $section == kernels ]]; then
  step kernel_checks checks
  step kernels_cuda_bf16 python3 benchmarks/kernels.py --device cuda --dtype bf16 --batch 64 128 256 --dim 65536 \
    --local-crops 10 --json "$OUT/kernels_cuda_bf16.json"
  step kernels_cuda_fp32 python3 benchmarks/kernels.py --device cuda --dtype fp32 --batch 64 128 256 --dim 65536 \
    --local-crops 10 --ops dino_ce --json "$OUT/kernels_cuda_fp32.json"
  # (10 timed runs: the fused head's teacher side is torch tiles, hundreds of small launches per call)
  step kernels_cuda_head_loss timeout 120 python3 benchmarks/kernels.py --device cuda --dtype fp32 \
    --batch 64 128 256 --dim 65536 --local-crops 10 --ops head_loss --repeats 10 \
    --json "$OUT/kernels_cuda_head_loss.json"
fi
if [[ $section == all || $section == throughput ]]; then
  step throughput_eager timeout 200 python3 benchmarks/throughput.py --preset r101_vit_b --batch 128,64 \
    --modes baseline,fast --no-compile --warmup 3 --steps 5 --time-budget 120 --json "$OUT/throughput_cuda_eager.json"
  step throughput_compiled timeout 240 python3 benchmarks/throughput.py --preset r101_vit_b --batch 128 \
    --modes fast --warmup 3 --steps 5 --json "$OUT/throughput_cuda_compiled.json"
fi
if [[ $section == all || $section == augmentation ]]; then
  step augmentation_cuda timeout 180 python3 benchmarks/augmentation.py --device cuda --stages decode,device \
    --images 128 --batch-size 64 --runs 3 --json "$OUT/augmentation_cuda.json"
fi

if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "device_check: all steps passed"
