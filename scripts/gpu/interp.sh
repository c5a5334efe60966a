#!/usr/bin/env bash
# The GPU's interpretability overhead on the Kimi-K2 slice (FORMAT bf16, fp8 or int4; 2 layers: the dense layer and
# one MoE layer with true K2 dimensions): plain batched decode against the same decode with every layer's
# resid_post captured on every token, with a different steering vector and coefficient on each of the 64 rows, and
# with both. Each row of STEPS (default "32 128" new tokens per row, the prompts' prefill included) runs once per
# entry of THREADS (KSCOPE_DELIVERY_THREADS: how many host threads file one pass's captured rows; "1" is the
# single delivery thread, "" the default), so the two are compared in one call. RUN=1 then runs the slice's full
# benchmark (bench_gpu run).
#   run: FORMAT=int4 bash scripts/gpu/interp.sh   (carry .deps; making the slice ~1-3 minutes)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
FORMAT=${FORMAT:-bf16}
gpu_device
echo "host threads: $(nproc)"
gpu_build bench_gpu bench_interp || exit 1
d=/tmp/k2-slice-$FORMAT-2
t0=$(date +%s)
[ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format $FORMAT --layers 2 2>&1 | tail -1
echo "make: $(( $(date +%s) - t0 )) s"
for st in ${STEPS:-32 128}; do
  for th in ${THREADS-1 default}; do
    echo "== interpretability overhead, $FORMAT, batch 64, $st steps, delivery threads: $th"
    if [ "$th" = default ]; then
      timeout 200 build-gpu/bench/bench_interp $d --device cuda --batch 64 --steps $st 2>&1 | tee "$OUT/interp-$FORMAT-$st-$th.txt" | tail -11
    else
      KSCOPE_DELIVERY_THREADS=$th timeout 200 build-gpu/bench/bench_interp $d --device cuda --batch 64 --steps $st 2>&1 | tee "$OUT/interp-$FORMAT-$st-$th.txt" | tail -11
    fi
  done
done
if [ "${RUN:-0}" = 1 ]; then
  echo "== bench_gpu run"
  timeout 240 build-gpu/bench/bench_gpu run $d --json "$OUT/kscope-$FORMAT.json" 2>&1 | tee "$OUT/kscope-$FORMAT.txt" | tail -30
fi
