#!/usr/bin/env bash
# The GPU's interpretability overhead on the Kimi-K2 slice (bf16, 2 layers: the dense layer and one MoE layer with
# true K2 dimensions): plain batched decode against the same decode with every layer's resid_post captured on
# every token, with a different steering vector and coefficient on each of the 64 rows, and with both; then the
# slice's full benchmark (bench_gpu run: MoE block, decode attention, decode steps, prefill) with this commit's
# kernels.   run: bash scripts/gpu/interp.sh   (carry .deps; about 6 minutes)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
gpu_build bench_gpu bench_interp || exit 1
d=/tmp/k2-slice-bf16-2
t0=$(date +%s)
[ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format bf16 --layers 2 2>&1 | tail -1
echo "make: $(( $(date +%s) - t0 )) s"
echo "== interpretability overhead, batch 64"
timeout 150 build-gpu/bench/bench_interp $d --device cuda --batch 64 --steps 32 2>&1 | tee "$OUT/interp-bf16.txt" | tail -8
echo "== bench_gpu run"
timeout 240 build-gpu/bench/bench_gpu run $d --json "$OUT/kscope-bf16.json" 2>&1 | tee "$OUT/kscope-bf16.txt" | tail -30
