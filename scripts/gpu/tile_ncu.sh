#!/usr/bin/env bash
# Why the many-row tile matmul is where it is: ncu's speed-of-light, occupancy, warp-stall, instruction and
# source-counter sections for k_gemm_tile on one dense case of `bench_gpu gemm` (default: the dense MLP's
# gate+up pair, bf16, 4096 rows; GEMM_MATRIX / GEMM_FMT / GEMM_ROWS pick another), both block widths; and the
# opcode mix of the kernel's SASS. No checkpoint needed. KERNEL=k_gemm_wg: the same for the warpgroup-MMA kernel.
#   run: bash scripts/gpu/tile_ncu.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_build bench_gpu || exit 1
export GEMM_MATRIX=${GEMM_MATRIX:-gate+up} GEMM_FMT=${GEMM_FMT:-bf16} GEMM_ROWS=${GEMM_ROWS:-4096}
timeout 60 build-gpu/bench/bench_gpu gemm | tail -2
# launches per width: 3 warm-up + 10 timed; the 4th of the 128-wide and the 4th of the 256-wide
K=${KERNEL:-k_gemm_tile}
timeout 300 ncu --clock-control none -k regex:$K --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats --section SourceCounters \
  build-gpu/bench/bench_gpu gemm > "$OUT/tile-ncu.txt" 2>&1
grep -E "$K|Duration|Throughput|Achieved Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Issue Slots|Executed Ipc|Pipe|Bank|L2 Hit|Shared" \
  "$OUT/tile-ncu.txt" | head -90
obj=$(find build-gpu -name "kernels.cu.o" | head -1)
cuobjdump -sass "$obj" > "$OUT/sass.txt" 2>/dev/null
fns="k_gemm_tileILi0ELi2ELi8ELb0ELb0E k_gemm_tileILi1ELi2ELi8ELb0ELb0E"
[ "$K" = k_gemm_wg ] && fns="k_gemm_wgILi0ELi256ELb0E"
for f in $fns; do
  echo "== SASS opcodes of $f"
  awk -v f="$f" '/Function :/ {on = index($0, f) > 0} on' "$OUT/sass.txt" > "$OUT/sass-one.txt"
  grep -oE "^\s+/\*[0-9a-f]+\*/\s+[A-Z0-9_.]+" "$OUT/sass-one.txt" | awk '{print $2}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25
  grep -nE "HMMA|HGMMA|WARPGROUP|SYNCS|UTMALDG|BAR|LDGDEPBAR|DEPBAR|LDS|LDGSTS" "$OUT/sass-one.txt" | head -150 > "$OUT/sass-loop-$f.txt"
done
rm -f "$OUT/cmake.log" "$OUT/build.log" "$OUT/sass.txt" "$OUT/sass-one.txt"
