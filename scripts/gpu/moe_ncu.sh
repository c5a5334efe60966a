#!/usr/bin/env bash
# Per-kernel view of the MoE block (ncu, clocks left alone): for each of TOKENS (default "64 256") on the 2-layer
# Kimi-K2 slice in FORMAT (default int4), every kernel of one MoE block with its duration, grid, DRAM throughput (%
# of peak), achieved occupancy and issue-slot use, in launch order. ENVS as in moe_env.sh ("-" for none) repeats the
# profile under each setting.
#   run: TOKENS="64 256" ENVS="- KSCOPE_FEW_BY_ROWS=0" bash scripts/gpu/moe_ncu.sh   (carry .deps)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
gpu_device
t0=$(date +%s)
gpu_build bench_gpu || exit 1
FORMAT=${FORMAT:-int4}
d=/tmp/k2-slice-$FORMAT-2
[ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format $FORMAT --layers 2 > "$OUT/make.txt" 2>&1 || { tail "$OUT/make.txt"; exit 1; }
echo "build + slice: $(( $(date +%s) - t0 )) s"
m=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,sm__inst_issued.avg.pct_of_peak_sustained_active,launch__grid_size,launch__occupancy_limit_shared_mem,launch__occupancy_limit_registers
for T in ${TOKENS:-64 256}; do
  for e in ${ENVS:--}; do
    if [ "$e" = "-" ]; then envs=(); else envs=("$e"); fi
    f="$OUT/ncu-$T-${e//[^A-Za-z0-9]/_}.csv"
    env "${envs[@]}" timeout 200 ncu --clock-control none --profile-from-start off --metrics $m --csv \
      build-gpu/bench/bench_gpu profile $d --tokens $T > "$f" 2>"$f.err" || { tail -5 "$f.err"; continue; }
    echo "== MoE block at $T tokens ($e)"
    python3 - "$f" <<'EOF'
import sys
sys.path.insert(0, "scripts/gpu")
from ncu_csv import kernels
k = kernels(sys.argv[1])
# the MoE block: the kernels before the decode step's first (the profile runs the block, then one decode step);
# the block ends at the first kernel after which the step's embedding starts: print until the first 'embed'
tot = 0.0
print(f"{'kernel':58s} {'us':>8s} {'grid':>7s} {'dram%':>6s} {'warps%':>6s} {'issue%':>6s} lim smem/regs")
for kid, v in k.items():
    if "embed" in v["name"]: break
    t = float(v.get("gpu__time_duration.sum", 0)) / 1e3; tot += t
    print(f"{v['name'][:58]:58s} {t:8.1f} {v.get('launch__grid_size','?'):>7s} {float(v.get('dram__throughput.avg.pct_of_peak_sustained_elapsed',0)):6.1f} "
          f"{float(v.get('sm__warps_active.avg.pct_of_peak_sustained_active',0)):6.1f} {float(v.get('sm__inst_issued.avg.pct_of_peak_sustained_active',0)):6.1f} "
          f"{v.get('launch__occupancy_limit_shared_mem','?')}/{v.get('launch__occupancy_limit_registers','?')}")
print(f"{'sum':58s} {tot:8.1f}")
EOF
    rm -f "$f.err"
  done
done
echo "total: $(( $(date +%s) - t0 )) s"
