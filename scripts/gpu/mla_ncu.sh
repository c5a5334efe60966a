#!/usr/bin/env bash
# Why the absorbed decode attention is far from its floor: ncu's speed-of-light, occupancy and warp-stall sections
# for the MLA kernels (k_qlat16, k_mla_wg, k_mla_combine, k_uv16) at batch 1 × 64 cached tokens (the batch-1
# decode step's fixed costs) and batch 64 × 4096 (issue 6's target shape). No checkpoint needed.
#   run: bash scripts/gpu/mla_ncu.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_build bench_gpu || exit 1
for size in 1x64 64x4096; do
  echo "== $size"
  MLA_SIZES=$size MLA_SKIP_SIMPLE=1 timeout 200 ncu --clock-control none -k regex:'k_(qlat16|mla_decode|mla_wg|mla_combine|uv16|head_mm)' \
    --launch-skip 4 --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats build-gpu/bench/bench_gpu mla > "$OUT/mla-ncu-$size.txt" 2>&1
  grep -E "k_(qlat16|mla_decode|mla_wg|mla_combine|uv16|head_mm)|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Grid Size" \
    "$OUT/mla-ncu-$size.txt" | head -80
done
rm -f "$OUT/cmake.log" "$OUT/build.log"
