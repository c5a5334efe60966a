#!/usr/bin/env bash
# Warp stall reasons (issue-stall cycles per issued instruction, by reason) and pipe utilizations of KERNEL (default
# k_gemm_tile), each execution pipe's use, on one dense case of `bench_gpu gemm` (default gate+up, bf16, 4096 rows; GEMM_MATRIX / GEMM_FMT /
# GEMM_ROWS; space-separated GEMM_FMT and GEMM_ROWS profile each pair in turn). No checkpoint needed.
#   run: bash scripts/gpu/tile_stalls.sh   KERNEL=k_gemm_few GEMM_ROWS="8 32" GEMM_FMT="int4 fp8" ...   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_build bench_gpu || exit 1
export GEMM_MATRIX=${GEMM_MATRIX:-gate+up}
KERNEL=${KERNEL:-k_gemm_tile}
m=$(ncu_stall_metrics)
m="$m,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_hmma.sum"
m="$m,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"
m="$m,lts__t_bytes.sum,dram__bytes.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum"
m="$m,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active"
# each execution pipe's share of its peak issue rate (the names this ncu knows for the device)
for p in $(ncu --query-metrics --chip gh100 2>/dev/null | awk '{print $1}' |
           grep -E '^sm__inst_executed_pipe_(alu|fma|fmaheavy|fmalite|fp16|xu|lsu|uniform|cbu|adu|tensor_op_hmma)$'); do
  m="$m,$p.avg.pct_of_peak_sustained_active,$p.sum"
done
for f in ${GEMM_FMT:-bf16}; do
  for r in ${GEMM_ROWS:-4096}; do
    echo "== $KERNEL, $GEMM_MATRIX, $f, $r rows"
    GEMM_FMT=$f GEMM_ROWS=$r timeout 300 ncu --clock-control none -k regex:$KERNEL --launch-skip 3 --launch-count 1 --metrics "$m" \
      build-gpu/bench/bench_gpu gemm 2>&1 | grep -E "smsp__|sm__|l1tex|lts|dram|gpu__|launch__" | sed 's/smsp__average_warps_issue_stalled_//' |
      awk '$NF != "0" && $NF != "0.00"'
  done
done
rm -f "$OUT/cmake.log" "$OUT/build.log"
