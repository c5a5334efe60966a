#!/usr/bin/env bash
# The expert matmuls: builds, checks the CUDA backend (every op test; FULL=1 the HF parity tests too), then times the
# MoE block of the Kimi-K2 slice (`bench_gpu moe`, 1-2048 tokens) in each of FORMATS (default "int4 fp8 bf16"; 2
# layers). With PATCH (a patch file in the tree, -p1) the same table also comes from a second build with the patch
# applied (B), in the same call, each format's A and B back to back.
#   run: FULL=1 PATCH=scratch/old.patch bash scripts/gpu/moe.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_device
t0=$(date +%s)
gpu_build $(gpu_test_targets) bench_gpu || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
B=
if [ -n "${PATCH:-}" ]; then  # build B in a copy of the tree while the tests run
  B=/tmp/moe-b
  gpu_copy_tree $B "$PATCH" || exit 1
  gpu_build_in $B bench_gpu > "$OUT/build-b.txt" 2>&1 &
  bpid=$!
fi
FORMATS=${FORMATS:-int4 fp8 bf16}
first=${FORMATS%% *}
( build-gpu/bench/bench_gpu make /tmp/k2-slice-$first-2 --format $first --layers 2 > "$OUT/make-$first.txt" 2>&1 ) &
mpid=$!
status=0
gpu_op_tests '*matmul*:*moe*:*expert*:*linear*' || status=1
echo "tests: $(( $(date +%s) - t0 )) s"
[ -n "$B" ] && { wait $bpid || { cat "$OUT/build-b.txt"; exit 1; }; }
for f in $FORMATS; do
  d=/tmp/k2-slice-$f-2
  if [ "$f" = "$first" ]; then wait $mpid; else
    rm -rf /tmp/k2-slice-*
    build-gpu/bench/bench_gpu make $d --format $f --layers 2 > "$OUT/make-$f.txt" 2>&1
  fi
  for v in A ${B:+B}; do
    bin=build-gpu/bench/bench_gpu
    [ $v = B ] && bin=$B/build-gpu/bench/bench_gpu
    echo "== $f $v"
    timeout 200 $bin moe $d --json "$OUT/moe-$f-$v.json" 2>&1 | grep -v "^ *writing" | tee "$OUT/moe-$f-$v.txt" | sed -n '/^MoE/,$p'
  done
  echo "($f: $(( $(date +%s) - t0 )) s)"
done
[ $status = 0 ] && echo "CHECK PASSED" || echo "CHECK FAILED"
exit $status
