#!/usr/bin/env bash
# Warp stall reasons (stall cycles per issued instruction, by reason), instruction counts, tensor-pipe use and
# traffic of the decode attention kernel (k_mla_wg, or k_mla_decode with MLA_MMA_SYNC=1) at batch 64 × 4096 (or
# MLA_SIZES). No checkpoint needed.   run: bash scripts/gpu/mla_stalls.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_build bench_gpu || exit 1
m=$(ncu_stall_metrics)
m="$m,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
m="$m,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,lts__t_bytes.sum,dram__bytes.sum,gpu__time_duration.sum"
MLA_SIZES=${MLA_SIZES:-64x4096} MLA_SKIP_SIMPLE=1 timeout 300 ncu --clock-control none -k regex:'k_mla_(wg|decode)' \
  --launch-skip 2 --launch-count 1 --metrics "$m" build-gpu/bench/bench_gpu mla 2>&1 |
  grep -E "k_mla|smsp__|sm__|l1tex|lts|dram|gpu__" | sed 's/smsp__average_warps_issue_stalled_//'
rm -f "$OUT/cmake.log" "$OUT/build.log"
