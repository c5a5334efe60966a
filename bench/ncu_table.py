#!/usr/bin/env python3
"""Per-kernel times from `ncu --csv --metrics gpu__time_duration.sum` of `bench_gpu profile`: the first profiled
range is titled by argv[2], the second by argv[3] (ranges are told apart by the kernel IDs restarting after the
MoE block's last kernel: bench_gpu profiles the MoE block, then the decode step). Prints each kernel in launch
order, then the sum per range, and the wall times bench_gpu printed on stdout (mixed into the CSV file)."""
import csv
import io
import re
import sys

path, titles = sys.argv[1], sys.argv[2:]
text = open(path).read()
lines = text.splitlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
walls = [l for l in lines if l.startswith("MoE block,")]
if start is None:
    print(f"{path}: no ncu rows")
    print("\n".join(lines[-10:]))
    sys.exit(0)
rows = list(csv.DictReader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
kern = [r for r in rows if r.get("Metric Name") == "gpu__time_duration.sum"]
# the MoE block is profiled first and ends with its last add; the decode step starts with the embedding
ranges, cur = [], []
for r in kern:
    name = r["Kernel Name"]
    if cur and "k_embed" in name and not any("k_embed" in c["Kernel Name"] for c in cur):
        ranges.append(cur)
        cur = []
    cur.append(r)
if cur:
    ranges.append(cur)
for i, rg in enumerate(ranges):
    title = titles[i] if i < len(titles) else f"range {i}"
    total = 0.0
    print(f"\n== {title}: {len(rg)} kernels")
    agg = {}
    for r in rg:
        v = float(r["Metric Value"].replace(",", ""))
        us = v / 1000.0 if r["Metric Unit"] in ("nsecond", "ns") else v
        if r["Metric Unit"] == "usecond":
            us = v
        elif r["Metric Unit"] == "msecond":
            us = v * 1000
        total += us
        short = r["Kernel Name"].replace("(anonymous namespace)::", "").replace("<unnamed>::", "").replace("kscope::cuda::", "")
        short = re.sub(r"\(.*", "", short).replace("void ", "")
        key = (short, r["Grid Size"])
        a = agg.setdefault(key, [0, 0.0])
        a[0] += 1
        a[1] += us
    for (short, grid), (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"  {us:9.1f} us  {n:3d}x  {short[:60]:60s} grid {grid}")
    print(f"  {total:9.1f} us  sum of kernel times")
for w in walls:
    print(w, "(under the profiler: not the wall time)")
