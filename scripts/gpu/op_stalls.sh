#!/usr/bin/env bash
# Duration and warp stall reasons (issue-stall cycles per issued instruction, by reason) of one small kernel as the
# CUDA op tests launch it: KERNEL (a regex, default k_route) in the tests matching FILTER (default the router test),
# its first launch there, profiled twice — caches flushed before it (ncu's default: code and data come from DRAM,
# as after a MoE layer's weights have streamed through L2) and caches left warm. No checkpoint needed.
#   run: KERNEL=k_moe_combine FILTER='*shared_expert*' bash scripts/gpu/op_stalls.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_build test_cuda_backend || exit 1
KERNEL=${KERNEL:-k_route}
FILTER=${FILTER:-*router_choices*}
m=$(ncu_stall_metrics)
m="$m,smsp__inst_executed.sum,gpu__time_duration.sum,launch__grid_size,launch__registers_per_thread"
for cc in all none; do
  echo "== $KERNEL ($FILTER), cache control: $cc"
  KSCOPE_REQUIRE_CUDA=1 timeout 300 ncu --clock-control none --cache-control $cc -k regex:$KERNEL --launch-count 1 --metrics "$m" \
    build-gpu/tests/test_cuda_backend --gtest_filter="$FILTER" 2>&1 | grep -E "smsp__|gpu__|launch__" |
    sed 's/smsp__average_warps_issue_stalled_//' | awk '$NF != "0" && $NF != "0.00"'
done
rm -f "$OUT/cmake.log" "$OUT/build.log"
