#!/usr/bin/env bash
# Checks the CUDA backend (every op test, the HF parity tests on the device), then on the Kimi-K2 slice in FORMAT
# (default bf16; LAYERS as bench.sh) optionally measures the interpretability overhead at batch 64 (INTERP=1) and
# the slice benchmark (RUN=1: bench_gpu run, JSON under $OUT), and profiles with ncu (hardware clocks left alone)
# the MoE block at PROFILE_TOKENS tokens (default "1 64"; empty: none) and one batch-1 decode step: every kernel's
# time, largest first, and the sum, next to the wall times measured without the profiler. INVARIANT=1 also runs
# the parity tests with the batch-invariant decode attention split and measures what that split costs. GEMM=1
# times the dense matmul kernels alone at K2 shapes (streamed vs many-row tile vs cuBLAS; no checkpoint needed).
# PREFILL=T profiles one prefill of 1 x T tokens with ncu. MOE_COMPARE=1 (with RUN=1) also times the MoE block
# with the many-row kernel off; KSCOPE_TILE_ROWS=dense,group moves its thresholds. With none of RUN, INTERP,
# PROFILE_TOKENS, PREFILL (PROFILE_TOKENS= empty) no slice is written.
#   run: bash scripts/gpu/profile.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_device
t0=$(date +%s)
gpu_build test_cuda_backend test_parity bench_interp bench_gpu || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
FORMAT=${FORMAT:-bf16}
case $FORMAT in bf16) n=2 ;; fp8) n=3 ;; *) n=5 ;; esac
n=${LAYERS:-$n}
d=/tmp/k2-slice-$FORMAT-$n
# the disk holds one slice: others go first. The slice is written while the tests run (disk and CPU, not the GPU)
need_slice=
[ "${RUN:-0}" = 1 ] || [ "${INTERP:-0}" = 1 ] || [ -n "${PROFILE_TOKENS-1 64}" ] || [ -n "${PREFILL:-}" ] && need_slice=1
maker=
if [ -n "$need_slice" ]; then
  for o in /tmp/k2-slice-*; do [ -e "$o" ] && [ "$o" != "$d" ] && rm -rf "$o"; done
  ( [ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format $FORMAT --layers $n > "$OUT/make.txt" 2>&1 ) &
  maker=$!
fi
status=0
KSCOPE_REQUIRE_CUDA=1 timeout 200 build-gpu/tests/test_cuda_backend >"$OUT/ops.txt" 2>&1 || status=1
KSCOPE_TEST_DEVICE=cuda timeout 120 build-gpu/tests/test_parity >"$OUT/parity.txt" 2>&1 || status=1
if [ -n "${INVARIANT:-}" ]; then  # the model against HF with decode attention split per row
  KSCOPE_INVARIANT_ATTENTION=1 KSCOPE_TEST_DEVICE=cuda timeout 120 build-gpu/tests/test_parity >>"$OUT/parity.txt" 2>&1 || status=1
fi
grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/ops.txt" "$OUT/parity.txt"
grep -B2 -A8 "Failure" "$OUT/ops.txt" "$OUT/parity.txt" | head -30
grep "rel err" "$OUT/ops.txt" | awk '{for(i=1;i<=NF;i++) if($i=="err") e=$(i+1); k=$1" "$2; if(!(k in w)||e+0>w[k]+0) w[k]=e}
  END {for(k in w) printf "  worst %-22s %s\n", k, w[k]}' | sort
if [ "${GEMM:-0}" = 1 ]; then
  timeout 200 build-gpu/bench/bench_gpu gemm --json "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.txt"
fi
[ -n "$maker" ] && wait $maker
echo "tests + slice: $(( $(date +%s) - t0 )) s"
if [ "${INTERP:-0}" = 1 ]; then
  timeout 120 build-gpu/bench/bench_interp $d --device cuda --batch 64 --steps 32 2>&1 | tee "$OUT/interp-$FORMAT.txt" | tail -6
  if [ -n "${COMPARE_COPY:-}" ]; then  # captures copied out on the compute stream, to compare
    echo "== interpretability overhead, captures copied on the compute stream"
    KSCOPE_COPY_STREAM=0 timeout 120 build-gpu/bench/bench_interp $d --device cuda --batch 64 --steps 32 2>&1 | tail -6
  fi
fi
if [ "${RUN:-0}" = 1 ]; then
  timeout ${RUN_LIMIT:-240} build-gpu/bench/bench_gpu run $d --json "$OUT/kscope-$FORMAT.json" 2>&1 | tee "$OUT/kscope-$FORMAT.txt" | grep -v "^  writing"
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
if [ -n "${PREFILL:-}" ]; then
  echo "== profile prefill 1 x $PREFILL"
  timeout 150 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
    build-gpu/bench/bench_gpu profile $d --prefill $PREFILL > "$OUT/ncu-prefill.csv" 2>"$OUT/ncu-prefill.err"
  timeout 60 build-gpu/bench/bench_gpu profile $d --prefill $PREFILL 2>&1 | tail -1
  python3 bench/ncu_table.py "$OUT/ncu-prefill.csv" "prefill 1 x $PREFILL" > "$OUT/ncu-prefill.txt"
  head -25 "$OUT/ncu-prefill.txt"; grep -E "sum of kernel" "$OUT/ncu-prefill.txt"
  rm -f "$OUT/ncu-prefill.csv" "$OUT/ncu-prefill.err"
fi
for T in ${PROFILE_TOKENS-1 64}; do
  echo "== profile $T"
  timeout 60 build-gpu/bench/bench_gpu profile $d --tokens $T 2>&1 | tail -1
  timeout 150 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
    build-gpu/bench/bench_gpu profile $d --tokens $T > "$OUT/ncu-$T.csv" 2>"$OUT/ncu-$T.err"
  python3 bench/ncu_table.py "$OUT/ncu-$T.csv" "MoE block at $T tokens" "decode step, batch 1" > "$OUT/ncu-$T.txt"
  head -12 "$OUT/ncu-$T.txt"; grep -E "sum of kernel" "$OUT/ncu-$T.txt"
  rm -f "$OUT/ncu-$T.csv" "$OUT/ncu-$T.err"
done
if [ -n "${INVARIANT:-}" ]; then  # what the batch-invariant attention split costs
  for inv in "" 1; do
    echo "== decode attention, split ${inv:+per row (batch-invariant)}${inv:-to fill the GPU}"
    KSCOPE_INVARIANT_ATTENTION=$inv MLA_SIZES=1x4096,1x32768,8x4096,64x4096,128x4096 MLA_SKIP_SIMPLE=1 \
      timeout 120 build-gpu/bench/bench_gpu mla 2>&1 | grep -vE "^device" | cut -c1-70
  done
fi
echo "total: $(( $(date +%s) - t0 )) s"
rm -f "$OUT/cmake.log" "$OUT/build.log" "$OUT/make.txt"  # at most 8 files come back
[ $status = 0 ] && rm -f "$OUT/ops.txt" "$OUT/parity.txt"
[ $status = 0 ] && echo "CHECK PASSED" || echo "CHECK FAILED"
exit $status
