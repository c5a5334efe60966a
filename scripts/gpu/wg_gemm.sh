#!/usr/bin/env bash
# The many-row matmul on warpgroup MMA (k_gemm_wg): builds, runs the matmul op tests (streamed vs tile vs wgmma bit
# identity, CPU reference) and times the dense K2 shapes on the streamed, mma.sync tile, wgmma kernels and cuBLAS.
#   run: bash scripts/gpu/wg_gemm.sh   (carry .deps; GEMM_ROWS, GEMM_FMT (formats, e.g. "bf16 fp8"), GEMM_MATRIX, KSCOPE_WG_ROWS pass through;
#        TESTS=0 skips the tests, FULL=1 runs all CUDA op tests, GEMM=0 skips the matmul table; RUN="bf16" also makes
#        that slice and runs bench_gpu run on it once per KSCOPE_WG_GEMM value in WG="1 0")
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
gpu_build bench_gpu $(gpu_test_targets) || exit 1
status=0
[ "${TESTS:-1}" != 0 ] && { gpu_op_tests '*matmul*' || status=1; }
if [ "${GEMM:-1}" != 0 ]; then
  for f in ${GEMM_FMT:-bf16}; do
    GEMM_ROWS=${GEMM_ROWS:-128,512,4096} GEMM_FMT=$f build-gpu/bench/bench_gpu gemm --json "$OUT/gemm-$f.json" | tee "$OUT/gemm-$f.txt"
  done
fi
for f in ${RUN:-}; do
  d=/tmp/k2-slice-$f-2
  [ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format $f --layers 2 2>&1 | tail -1
  for v in ${WG:-1 0}; do
    echo "== bench_gpu run $f, KSCOPE_WG_GEMM=$v"
    KSCOPE_WG_GEMM=$v build-gpu/bench/bench_gpu run $d --json "$OUT/run-$f-wg$v.json" > "$OUT/run-$f-wg$v.txt" 2>&1
    grep -A14 "^MoE block" "$OUT/run-$f-wg$v.txt"; grep -A8 "step ms" "$OUT/run-$f-wg$v.txt"; grep -i "prefill" "$OUT/run-$f-wg$v.txt"
  done
done
exit $status
