#!/usr/bin/env bash
# First GPU benchmark of the CUDA backend on a Kimi-K2-layer-shaped slice (true K2 dimensions: hidden 7168, 384
# experts top-8, moe_intermediate 2048, 64 MLA heads, vocabulary 163840; 1 dense layer + as many MoE layers as fit
# an 80 GB H100 with room for the KV cache: LAYERS_bf16=2, LAYERS_fp8=3, LAYERS_int4=5 total layers by default),
# in each format named in FORMATS (default: bf16 fp8 int4), side by side with HF transformers on the same checkpoint.
#   FORMATS=bf16 bash scripts/gpu/bench.sh         (carry .deps; one format fits one 10-minute call; HF=0 skips HF
#                                                   transformers, whose figures do not change with our commits)
# Prints one markdown table per format (bench/gpu_report.py); JSON and logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
FORMATS=${FORMATS:-bf16 fp8 int4}
gpu_build bench_gpu bench_interp || exit 1
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
LAYERS_bf16=${LAYERS_bf16:-2}; LAYERS_fp8=${LAYERS_fp8:-3}; LAYERS_int4=${LAYERS_int4:-5}
for f in $FORMATS; do
  n=$(eval echo \$LAYERS_$f)
  d=/tmp/k2-slice-$f-$n
  [ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format $f --layers $n 2>&1 | tail -1
  build-gpu/bench/bench_gpu run $d --json "$OUT/kscope-$f.json" 2>&1 | tee "$OUT/kscope-$f.txt" | tail -40
  # interpretability overhead: 64 rows each with its own steering vector and coefficient, capture of every layer's
  # resid_post and final_norm on every token, against plain decode
  # (INTERP_STEPS="32 128": also over more decode steps, where the prompts' prefill weighs less)
  for st in ${INTERP_STEPS:-32}; do
    sfx=""; [ "$st" != 32 ] && sfx="-$st"
    build-gpu/bench/bench_interp $d --device cuda --batch 64 --steps $st 2>&1 | tee "$OUT/interp-$f$sfx.txt" | tail -8
  done
  if [ "${HF:-1}" = 0 ]; then
    echo '{"error": "HF transformers not run in this call (HF=0)"}' > "$OUT/hf-$f.json"
  elif [ "$f" != int4 ]; then
    python3 bench/hf_bench.py $d "$OUT/hf-$f.json" > "$OUT/hf-$f.txt" 2>&1 || tail -5 "$OUT/hf-$f.txt"
  else
    echo '{"error": "HF transformers reads compressed-tensors INT4 only through the compressed-tensors package, which this image lacks"}' > "$OUT/hf-$f.json"
  fi
  rm -rf $d
done
python3 bench/gpu_report.py "$OUT" "$(date -u +%F)" "$commit"
