#!/usr/bin/env python3
"""Formats scripts/gpu/bench.sh's JSON (kscope-FMT.json from bench_gpu, hf-FMT.json from hf_bench.py) as one
markdown table per format: measured value, floor, fraction of the floor, HF's value and the ratio.

    python3 bench/gpu_report.py OUT_DIR DATE COMMIT
"""
import glob
import json
import os
import sys


def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    d, date, commit = sys.argv[1], sys.argv[2], sys.argv[3]
    for kp in sorted(glob.glob(os.path.join(d, "kscope-*.json"))):
        fmt = os.path.basename(kp)[7:-5]
        k = load(kp)
        h = load(os.path.join(d, f"hf-{fmt}.json")) or {}
        bw, tc = k["hbm_bytes_per_s"], k["bf16_flops"]
        layers = k.get("layers", 2)
        print(f"\n### {fmt}, {layers} layers (1 dense + {layers - 1} MoE) — {k['device']}, {date}, commit {commit}\n")
        print(f"Floors from the device: HBM {bw / 1e9:.0f} GB/s (2 GiB device-to-device copy, read+write), "
              f"BF16 tensor cores {tc / 1e12:.0f} TFLOP/s (cuBLAS 8192³).")
        hv = f"transformers {h.get('transformers', '?')}, experts={h.get('experts_implementation')}"
        if "error" in h:
            hv += f" — HF could not load it: {h['error'][:160]}"
        print(f"HF: {hv}\n")
        print("| measure | kscope | floor | of floor | HF | speed-up over HF |")
        print("|---|---:|---:|---:|---:|---:|")
        hm = {r["tokens"]: r for r in h.get("moe", [])}
        for r in k["moe"]:
            fl = max(r["bw_floor"], r["tc_floor"])
            hr = hm.get(r["tokens"], {})
            hs = f"{hr['seconds'] * 1e6:.0f} µs" if "seconds" in hr else hr.get("error", "—")[:40]
            ratio = f"{hr['seconds'] / r['seconds']:.2f}×" if "seconds" in hr else "—"
            bound = "bw" if r["bw_floor"] >= r["tc_floor"] else "tc"
            print(f"| MoE block, {r['tokens']} tok ({r['experts']} experts) | {r['seconds'] * 1e6:.0f} µs | "
                  f"{fl * 1e6:.0f} µs ({bound}) | {100 * fl / r['seconds']:.0f}% | {hs} | {ratio} |")
        m = k["mla_decode"]
        mf = m["bytes"] / bw
        print(f"| MLA decode attention, batch {m['batch']} × {m['context']} ctx | {m['seconds'] * 1e6:.0f} µs | "
              f"{mf * 1e6:.0f} µs (bw) | {100 * mf / m['seconds']:.0f}% | — | — |")
        hd = {r["batch"]: r for r in h.get("decode", [])}
        for r in k["decode"]:
            hr = hd.get(r["batch"], {})
            if "error" in r:
                print(f"| decode, batch {r['batch']} | failed: {r['error'][:60]} | | | | |")
                continue
            hs = f"{hr['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in hr else hr.get("error", "—")[:40]
            ratio = f"{r['tokens_per_s'] / hr['tokens_per_s']:.2f}×" if "tokens_per_s" in hr else "—"
            print(f"| decode, batch {r['batch']} | {r['tokens_per_s']:.1f} tok/s ({r['step_seconds'] * 1e3:.1f} ms/step) "
                  f"| | | {hs} | {ratio} |")
        p = k["prefill"]
        hp = h.get("prefill", {})
        pf = p["flops"] / tc
        hs = f"{hp['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in hp else hp.get("error", "—")[:40]
        ratio = f"{p['tokens_per_s'] / hp['tokens_per_s']:.2f}×" if "tokens_per_s" in hp else "—"
        print(f"| prefill 4 × 1024 | {p['tokens_per_s']:.0f} tok/s | {pf * 1e3:.0f} ms (tc) | "
              f"{100 * pf / p['seconds']:.0f}% | {hs} | {ratio} |")
        hl = f"{h['load_seconds']:.0f} s" if "load_seconds" in h else "—"
        print(f"| load | {k['load_seconds']:.1f} s ({k['load_bytes'] / 1e9 / k['load_seconds']:.2f} GB/s) | | | {hl} | |")
        hpk = f"{h['peak_bytes'] / 1e9:.1f} GB" if "peak_bytes" in h else "—"
        print(f"| peak device memory | {k['peak_bytes'] / 1e9:.1f} GB (weights {k['weight_bytes'] / 1e9:.1f} GB) | | | "
              f"{hpk} (torch max allocated) | |")


if __name__ == "__main__":
    main()
