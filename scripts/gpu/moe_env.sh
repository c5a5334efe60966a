#!/usr/bin/env bash
# A/B of a runtime switch on the MoE block, one build: builds, runs the CUDA op tests (FULL=1: every one and the HF
# parity tests; else the matmul/MoE ones), then for each of FORMATS (default "int4") makes the 2-layer Kimi-K2 slice
# and times `bench_gpu moe` under each setting of ENVS (space-separated VAR=value words, "-" for none), REPEAT rounds
# (default 2) in turn: A B A B. Prints each table's rows side by side as time in us per setting, alone (one call
# synchronized) and queued (calls back to back).
#   run: ENVS="KSCOPE_FEW_BY_ROWS=1 KSCOPE_FEW_BY_ROWS=0" FORMATS="int4 fp8" bash scripts/gpu/moe_env.sh  (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_device
t0=$(date +%s)
gpu_build $(gpu_test_targets) bench_gpu || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
FORMATS=${FORMATS:-int4}
ENVS=${ENVS:--}
REPEAT=${REPEAT:-2}
first=${FORMATS%% *}
( build-gpu/bench/bench_gpu make /tmp/k2-slice-$first-2 --format $first --layers 2 > "$OUT/make-$first.txt" 2>&1 ) &
mpid=$!
status=0
gpu_op_tests '*matmul*:*moe*:*expert*:*linear*:*split*' || status=1
echo "tests: $(( $(date +%s) - t0 )) s"
for f in $FORMATS; do
  d=/tmp/k2-slice-$f-2
  if [ "$f" = "$first" ]; then wait $mpid; else
    rm -rf /tmp/k2-slice-*
    build-gpu/bench/bench_gpu make $d --format $f --layers 2 > "$OUT/make-$f.txt" 2>&1
  fi
  for r in $(seq 1 "$REPEAT"); do
    i=0
    for e in $ENVS; do
      i=$((i + 1))
      tag=$f-$i-r$r
      if [ "$e" = "-" ]; then envs=(); else envs=("$e"); fi
      env "${envs[@]}" timeout 200 build-gpu/bench/bench_gpu moe $d 2>&1 | grep -v "^ *writing" > "$OUT/moe-$tag.txt"
    done
  done
  echo "== $f: time us per setting (rounds side by side): $ENVS"
  python3 - "$OUT" "$f" "$REPEAT" $ENVS <<'EOF'
import sys, re
out, f, rep, envs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
rows = {}
for i in range(1, len(envs) + 1):
    for r in range(1, rep + 1):
        on = False
        for line in open(f"{out}/moe-{f}-{i}-r{r}.txt"):
            if line.startswith("MoE block"): on = True; continue
            # tokens, time alone, experts, bw floor, tc floor, of floor, queued time, of floor
            m = re.match(r"\s+(\d+)\s+([\d.]+)\s+\d+\s+([\d.]+)\s+[\d.]+\s+\d+%\s+([\d.]+)", line) if on else None
            if m:
                row = rows.setdefault(int(m[1]), {"floor": float(m[3])})
                row.setdefault(i, []).append(float(m[2]))
                row.setdefault(-i, []).append(float(m[4]))
print("time alone / queued, us, per round; (floor / the best queued time)")
print(" tokens  floor us  " + "  ".join(f"{e[:36]:>36}" for e in envs))
for t in sorted(rows):
    r = rows[t]
    cells = ["/".join(f"{v:.0f}" for v in r.get(i, [])) + " q " + "/".join(f"{v:.0f}" for v in r.get(-i, [])) +
             f" ({r['floor'] / min(r.get(-i, [1e9])):.0%})" for i in range(1, len(envs) + 1)]
    print(f"{t:7d} {r['floor']:9.1f}  " + "  ".join(f"{c:>36}" for c in cells))
EOF
  echo "($f: $(( $(date +%s) - t0 )) s)"
done
[ $status = 0 ] && echo "CHECK PASSED" || echo "CHECK FAILED"
exit $status
