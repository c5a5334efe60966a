source scripts/gpu/env.sh
gpu_build bench_gpu || exit 1
d=/tmp/k2-slice-bf16-2
[ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format bf16 --layers 2 > /dev/null 2>&1
for v in 0 1; do echo "== KSCOPE_MLA_MMA_SYNC=$v"; KSCOPE_MLA_MMA_SYNC=$v build-gpu/bench/bench_gpu profile $d --tokens 1 2>&1 | tail -1; done
timeout 150 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv build-gpu/bench/bench_gpu profile $d --tokens 1 > $OUT/n.csv 2>/dev/null
python3 bench/ncu_table.py $OUT/n.csv "MoE 1" "decode b1" > $OUT/n.txt; grep -A30 "decode b1" $OUT/n.txt | head -40
