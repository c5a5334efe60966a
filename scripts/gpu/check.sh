#!/usr/bin/env bash
# The CUDA backend's correctness on the GPU machine: builds, runs every op against the CPU reference
# (tests/test_cuda_backend.cpp) and the whole model against the HF transformers fixtures on the device
# (tests/test_parity.cpp with KSCOPE_TEST_DEVICE=cuda), and prints a table. Exit status 0 only if all passed.
#   run: bash scripts/gpu/check.sh            (carry .deps, made here by scripts/gpu/fetch-deps.sh)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_device
t0=$(date +%s)
gpu_build test_cuda_backend test_parity || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
status=0
KSCOPE_REQUIRE_CUDA=1 build-gpu/tests/test_cuda_backend >"$OUT/ops.txt" 2>&1 || status=1
KSCOPE_TEST_DEVICE=cuda build-gpu/tests/test_parity >"$OUT/parity.txt" 2>&1 || status=1
echo
echo "== op consistency (CUDA vs CPU reference): worst relative error per op family"
grep -E "rel err" "$OUT/ops.txt" | awk '{fam=$1; for(i=2;i<=NF;i++) if($i=="rel"){e=$(i+2); t=$(i+4)}; gsub(/\)/,"",t);
  if(!(fam in w) || e+0>w[fam]+0){w[fam]=e; tol[fam]=t}} END {for(f in w) printf "  %-10s %s (tol %s)\n", f, w[f], tol[f]}' | sort
grep -E "^\[  (PASSED|FAILED) |Failure|FAILED  \]|SKIPPED" "$OUT/ops.txt" | head -20
echo
echo "== parity with HF transformers 5.17 fixtures on the device"
grep -E "^\[       OK|^\[  FAILED|worst relative error" "$OUT/parity.txt" | sed 's/^/  /' | head -60
grep -E "^\[  (PASSED|FAILED) " "$OUT/parity.txt"
grep -B2 -A8 "Failure" "$OUT/parity.txt" | head -60
echo
[ $status = 0 ] && echo "CHECK PASSED" || echo "CHECK FAILED"
exit $status
