#!/usr/bin/env bash
# Checks the CUDA backend (every op test, the HF parity tests on the device) and then measures the GPU's
# interpretability overhead on the bf16 Kimi-K2 slice (scripts/gpu/interp.sh without the full slice benchmark).
#   run: bash scripts/gpu/overlap.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_device
gpu_build test_cuda_backend test_parity bench_interp bench_gpu || exit 1
status=0
KSCOPE_REQUIRE_CUDA=1 build-gpu/tests/test_cuda_backend >"$OUT/ops.txt" 2>&1 || status=1
KSCOPE_TEST_DEVICE=cuda build-gpu/tests/test_parity >"$OUT/parity.txt" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/ops.txt" "$OUT/parity.txt"
grep -B2 -A8 "Failure" "$OUT/ops.txt" "$OUT/parity.txt" | head -30
d=/tmp/k2-slice-bf16-2
[ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format bf16 --layers 2 2>&1 | tail -1
timeout 150 build-gpu/bench/bench_interp $d --device cuda --batch 64 --steps 32 2>&1 | tee "$OUT/interp-bf16.txt" | tail -8
[ $status = 0 ] && echo "CHECK PASSED" || echo "CHECK FAILED"
exit $status
