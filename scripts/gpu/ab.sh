#!/usr/bin/env bash
# A/B in one device call, for changes that cannot be switched at run time (launch bounds, compile-time constants):
# builds bench_gpu from the working tree (A) and from a copy of it with the sed script SED applied to FILE (B), then
# runs CMD once per build (REPEAT times), A first, with $BENCH_GPU naming that build's binary. PATCH (a patch file in the tree, -p1)
# instead of SED and FILE: B is the tree with that patch applied.
#   run: SED='s/x/y/' FILE=src/backend/cuda/kernels.cu CMD='$BENCH_GPU gemm' bash scripts/gpu/ab.sh   (carry .deps;
#        SLICE=bf16 first writes that 2-layer slice to /tmp/k2-slice-bf16-2 for CMDs that run it)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
gpu_build bench_gpu || exit 1
B=/tmp/ab-b
gpu_copy_tree $B "${PATCH:-}" || exit 1
if [ -z "${PATCH:-}" ]; then
  sed -i "$SED" "$B/$FILE"
  if diff -q "$FILE" "$B/$FILE" >/dev/null; then echo "ab.sh: SED changed nothing in $FILE"; exit 1; fi
  diff "$FILE" "$B/$FILE"
fi
gpu_build_in $B bench_gpu || exit 1
if [ -n "${SLICE:-}" ]; then
  d=/tmp/k2-slice-$SLICE-2
  [ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format $SLICE --layers 2 2>&1 | tail -1
fi
# REPEAT=n runs the pair n times (A B A B ...: drift of the machine shows as a difference between the rounds).
# CMD runs in a subshell, so its own variables (a `for i` loop) cannot change the rounds here.
for ab_round in $(seq 1 ${REPEAT:-1}); do
  for ab_v in A B; do
    if [ $ab_v = A ]; then BENCH_GPU=$PWD/build-gpu/bench/bench_gpu; else BENCH_GPU=$B/build-gpu/bench/bench_gpu; fi
    echo "== $ab_v${REPEAT:+ (round $ab_round)}"
    ( export BENCH_GPU; eval "$CMD" ) > "$OUT/ab-$ab_v$ab_round.txt" 2>&1
    grep -v "^ *writing" "$OUT/ab-$ab_v$ab_round.txt"
  done
done
rm -f "$OUT/cmake.log" "$OUT/build.log"
