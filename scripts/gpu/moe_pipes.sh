#!/usr/bin/env bash
# What bounds the MoE block's expert matmuls when memory does not: for each of TOKENS (default "16 64") on the
# 2-layer Kimi-K2 slice in each of FORMATS (default "fp8 int4"), ncu's per-pipe instruction rates (% of each pipe's
# peak while the SM is active) and DRAM throughput of the block's matmul kernels (the first LAUNCHES, default 4), and
# from the build's SASS the instruction mix of the streamed kernel's expert instances (opcodes per tensor-core mma).
# ENVS as in moe_env.sh ("-" for none) repeats the profile under each setting.
#   run: FORMATS=fp8 TOKENS="16 64" bash scripts/gpu/moe_pipes.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_device
t0=$(date +%s)
gpu_build bench_gpu || exit 1
# SASS opcode mix per mma of each k_gemm_few instance (the function names carry the template arguments)
obj=$(find build-gpu -name kernels.cu.o | head -1)
cuobjdump -sass "$obj" 2>/dev/null | python3 -c '
import re, sys, collections
fn, counts = None, {}
for line in sys.stdin:
    m = re.search(r"Function : (\S+)", line)
    if m: fn = m.group(1); counts[fn] = collections.Counter(); continue
    m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", line)
    if fn and m: counts[fn][m.group(1)] += 1
print("== SASS of k_gemm_few instances: opcodes per HMMA (static counts, unrolled loop bodies dominate)")
for f, c in counts.items():
    if "k_gemm_few" not in f: continue
    mma = sum(v for k, v in c.items() if k.startswith("HMMA"))
    if not mma: continue
    top = sorted(((v, k) for k, v in c.items() if not k.startswith("HMMA")), reverse=True)[:14]
    print(f"{f[:100]}\n   HMMA {mma}: " + ", ".join(f"{k} {v / mma:.2f}" for v, k in top))
' > "$OUT/sass-mix.txt"
head -c 6000 "$OUT/sass-mix.txt"
m="regex:sm__inst_executed_pipe_[a-z0-9_]+\.avg\.pct_of_peak_sustained_active$,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__inst_issued.avg.pct_of_peak_sustained_active,launch__grid_size"
for FORMAT in ${FORMATS:-fp8 int4}; do
  d=/tmp/k2-slice-$FORMAT-2
  rm -rf /tmp/k2-slice-*
  build-gpu/bench/bench_gpu make $d --format $FORMAT --layers 2 > "$OUT/make-$FORMAT.txt" 2>&1 || { tail "$OUT/make-$FORMAT.txt"; exit 1; }
  echo "build + slice: $(( $(date +%s) - t0 )) s"
  for T in ${TOKENS:-16 64}; do
    for e in ${ENVS:--}; do
      if [ "$e" = "-" ]; then envs=(); else envs=("$e"); fi
      f="$OUT/pipes-$FORMAT-$T-${e//[^A-Za-z0-9]/_}.csv"
      env "${envs[@]}" timeout 200 ncu --clock-control none --profile-from-start off -k regex:k_gemm \
        --launch-count "${LAUNCHES:-4}" --metrics "$m" --csv build-gpu/bench/bench_gpu profile $d --tokens $T > "$f" 2>"$f.err" ||
        { tail -5 "$f.err"; continue; }
      echo "== $FORMAT, MoE block at $T tokens ($e): matmul kernels, pipes above 3% of their peak"
      python3 - "$f" <<'EOF'
import sys
sys.path.insert(0, "scripts/gpu")
from ncu_csv import kernels
k = kernels(sys.argv[1])
for kid, v in k.items():
    t = float(v.get("gpu__time_duration.sum", 0)) / 1e3
    pipes = sorted(((float(x), n.split("pipe_")[1].split(".")[0]) for n, x in v.items() if "inst_executed_pipe_" in n and "realtime" not in n), reverse=True)
    print(f"  {v['name'][:60]:60s} {t:7.1f} us grid {v.get('launch__grid_size','?')} dram {float(v.get('dram__throughput.avg.pct_of_peak_sustained_elapsed',0)):.0f}% issue {float(v.get('sm__inst_issued.avg.pct_of_peak_sustained_active',0)):.0f}%")
    print("     " + ", ".join(f"{n} {p:.0f}%" for p, n in pipes if p >= 3))
EOF
      rm -f "$f.err"
    done
  done
done
rm -f "$OUT/cmake.log" "$OUT/build.log"
echo "total: $(( $(date +%s) - t0 )) s"
