#!/usr/bin/env bash
# Decode attention on the tensor cores: builds, checks the CUDA backend (every op against the CPU reference, the
# new decode kernel at K2's shapes included) and the whole model against the HF fixtures on the device, then
# benchmarks absorbed decode attention at K2's attention shapes, tensor-core kernel vs CUDA-core kernel.
#   run: bash scripts/gpu/mla.sh            (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_device
t0=$(date +%s)
gpu_build test_cuda_backend test_parity bench_gpu || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
status=0
KSCOPE_REQUIRE_CUDA=1 build-gpu/tests/test_cuda_backend >"$OUT/ops.txt" 2>&1 || status=1
KSCOPE_TEST_DEVICE=cuda build-gpu/tests/test_parity >"$OUT/parity.txt" 2>&1 || status=1
echo "== ops"
grep -E "rel err" "$OUT/ops.txt" | grep -iE "mla" | head -20
grep -E "^\[  (PASSED|FAILED) |Failure|FAILED  \]" -A3 "$OUT/ops.txt" | head -30
echo "== parity"
grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/parity.txt" | head
grep -B2 -A8 "Failure" "$OUT/parity.txt" | head -40
echo "== MLA decode benchmark"
timeout 240 build-gpu/bench/bench_gpu mla --json "$OUT/mla.json" 2>&1 | tee "$OUT/mla.txt"
echo "== the peer: HF transformers decode attention (torch sdpa over the expanded cache), same sizes"
timeout 200 python3 bench/hf_mla.py "$OUT/hf_mla.json" 2>&1 | tail -9
[ $status = 0 ] && echo "CHECK PASSED" || echo "CHECK FAILED"
exit $status
