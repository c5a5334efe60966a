#!/usr/bin/env bash
# Warp stall reasons (issue-stall cycles per issued instruction, by reason) and pipe utilizations of k_gemm_tile on
# one dense case of `bench_gpu gemm` (default gate+up, bf16, 4096 rows; GEMM_MATRIX / GEMM_FMT / GEMM_ROWS), the
# 128-feature block. No checkpoint needed.   run: bash scripts/gpu/tile_stalls.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_build bench_gpu || exit 1
export GEMM_MATRIX=${GEMM_MATRIX:-gate+up} GEMM_FMT=${GEMM_FMT:-bf16} GEMM_ROWS=${GEMM_ROWS:-4096}
m=""
for r in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle wait not_selected selected \
         dispatch_stall lg_throttle no_instruction drain branch_resolving imc_miss misc tex_throttle membar sleeping; do
  m="$m,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
done
m="${m#,},sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_hmma.sum"
m="$m,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,lts__t_bytes.sum,dram__bytes.sum,gpu__time_duration.sum"
timeout 300 ncu --clock-control none -k regex:k_gemm_tile --launch-skip 3 --launch-count 1 --metrics "$m" \
  build-gpu/bench/bench_gpu gemm 2>&1 | grep -E "k_gemm_tile|smsp__|sm__|l1tex|lts|dram|gpu__" | sed 's/smsp__average_warps_issue_stalled_//'
rm -f "$OUT/cmake.log" "$OUT/build.log"
