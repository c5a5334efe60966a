#!/usr/bin/env python3
"""Formats scripts/gpu/bench.sh's JSON (kscope-FMT.json from bench_gpu, hf-FMT.json from hf_bench.py, and
interp-FMT.txt from bench_interp) as markdown per format: first issue 6's targets (each target, the measured value,
its floor, the fraction, HF's value and the ratio, met or not), then every measurement.

    python3 bench/gpu_report.py OUT_DIR DATE COMMIT
"""
import glob
import json
import math
import os
import sys


def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def interp_ratios(path):
    """{'capture': r, 'steering': r, 'both': r} from bench_interp's table (vs plain decode)."""
    out = {}
    try:
        for line in open(path):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[2].replace(".", "", 1).isdigit():
                key = "both" if cells[0] == "both" else "capture" if cells[0].startswith("capture") else \
                    "steering" if "steering" in cells[0] else None
                if key:
                    out[key] = float(cells[2])
    except OSError:
        pass
    return out


def pct(f):
    """A fraction as a whole percentage or, where rounding would lift it onto a round figure (a multiple of 5%, where
    the targets lie), cut to one decimal: 0.798 is "79.8%" and 0.89996 "89.9%", not "80%" and "90%"."""
    p = 100 * f
    return f"{math.floor(p * 10) / 10:.1f}%" if round(p) % 5 == 0 and math.floor(p) != round(p) else f"{p:.0f}%"


def targets(k, h, interp):
    """Issue 6's targets as rows: (target, measured, floor, fraction, HF, ratio, met)."""
    bw, tc = k["hbm_bytes_per_s"], k["bf16_flops"]
    rows = []
    moe = {r["tokens"]: r for r in k["moe"]}
    hm = {r["tokens"]: r for r in h.get("moe", []) if "seconds" in r}

    # The MoE block alone (one call synchronized: its host work and launch latency exposed) and, where measured,
    # queued back to back as a decode step's layers run (the kernels' time); the target is judged on the latter, as
    # the decode attention's is. HF's ratio is against the time alone (HF's figure is one synchronized call).
    def sq(r):
        return r.get("seconds_queued") or r["seconds"]

    def frac_bw(r):
        return r["bw_floor"] / sq(r)

    def shown(r):
        q = r.get("seconds_queued")
        return f"{r['seconds'] * 1e6:.0f} µs" + (f" alone, {q * 1e6:.0f} µs queued" if q else "")

    def frac_shown(r):
        q = r.get("seconds_queued")
        return pct(r['bw_floor'] / r['seconds']) + (f" / {pct(r['bw_floor'] / q)}" if q else "")

    if 1 in moe:
        r = moe[1]
        hr = hm.get(1)
        rows.append(("MoE layer, 1 token: ≥ 80% of the bandwidth floor", shown(r),
                     f"{r['bw_floor'] * 1e6:.0f} µs", frac_shown(r),
                     f"{hr['seconds'] * 1e6:.0f} µs ({100 * r['bw_floor'] / hr['seconds']:.0f}%)" if hr else "—",
                     f"{hr['seconds'] / r['seconds']:.1f}×" if hr else "—", frac_bw(r) >= 0.8))
    mid = [moe[t] for t in sorted(moe) if 16 <= t <= 256]
    if mid:
        worst = min(mid, key=frac_bw)
        hr = hm.get(worst["tokens"])
        rows.append((f"MoE layer, 16-256 tokens: ≥ 90% (worst: {worst['tokens']} tokens)",
                     shown(worst), f"{worst['bw_floor'] * 1e6:.0f} µs",
                     f"{frac_shown(worst)} ({pct(min(map(frac_bw, mid)))[:-1]}-{pct(max(map(frac_bw, mid)))})",
                     f"{hr['seconds'] * 1e6:.0f} µs" if hr else "—", f"{hr['seconds'] / worst['seconds']:.1f}×" if hr else "—",
                     frac_bw(worst) >= 0.9))
    big = [moe[t] for t in sorted(moe) if t >= 2048]
    if big:
        r = big[0]
        f = r["tc_floor"] / sq(r)
        hr = hm.get(r["tokens"])
        rows.append((f"MoE layer, {r['tokens']} tokens: ≥ 60% of the tensor-core rate", shown(r),
                     f"{r['tc_floor'] * 1e6:.0f} µs (tc)", f"{100 * f:.0f}%", f"{hr['seconds'] * 1e6:.0f} µs" if hr else "—",
                     f"{hr['seconds'] / r['seconds']:.1f}×" if hr else "—", f >= 0.6))
    m = k["mla_decode"]
    mf = m["bytes"] / bw
    # alone (synchronized per call: its host work exposed) and, where measured, queued as a decode step's layers are
    mq = m.get("seconds_queued")
    rows.append((f"MLA decode, batch {m['batch']} × {m['context']}: ≥ 75% of the bandwidth floor",
                 f"{m['seconds'] * 1e6:.0f} µs" + (f" alone, {mq * 1e6:.0f} µs queued" if mq else ""), f"{mf * 1e6:.0f} µs",
                 pct(mf / m['seconds']) + (f" / {pct(mf / mq)}" if mq else ""), "—", "—",
                 mf / (mq or m["seconds"]) >= 0.75))
    dec = {r["batch"]: r for r in k["decode"] if "error" not in r}
    hd = {r["batch"]: r for r in h.get("decode", []) if "tokens_per_s" in r}
    if 1 in dec:
        r = dec[1]
        fb = k.get("decode_b1_bytes")
        fl = fb / bw if fb else None
        rows.append(("decode, batch 1: step ≤ 1.3× the sum of its kernels' floors", f"{r['step_seconds'] * 1e3:.2f} ms",
                     f"{fl * 1e3:.2f} ms" if fl else "—", f"{r['step_seconds'] / fl:.2f}× the floor" if fl else "—",
                     f"{hd[1]['step_seconds'] * 1e3:.1f} ms" if 1 in hd else "—",
                     f"{hd[1]['step_seconds'] / r['step_seconds']:.1f}× (target ≥ 10×)" if 1 in hd else "—",
                     (fl is not None and r["step_seconds"] <= 1.3 * fl) and (1 not in hd or hd[1]["step_seconds"] >= 10 * r["step_seconds"])))
    if 64 in dec:
        r = dec[64]
        rows.append(("decode, batch 64: ≥ 3× HF", f"{r['tokens_per_s']:.0f} tok/s", "", "",
                     f"{hd[64]['tokens_per_s']:.0f} tok/s" if 64 in hd else "—",
                     f"{r['tokens_per_s'] / hd[64]['tokens_per_s']:.1f}×" if 64 in hd else "—",
                     64 in hd and r["tokens_per_s"] >= 3 * hd[64]["tokens_per_s"]))
    if 256 in {r["batch"] for r in k["decode"]}:
        r = next(r for r in k["decode"] if r["batch"] == 256)
        rows.append(("decode, batch 256 runs", f"{r['tokens_per_s']:.0f} tok/s" if "error" not in r else r["error"][:40],
                     "", "", "—", "—", "error" not in r))
    p = k["prefill"]
    pf = p["flops"] / tc
    hp = h.get("prefill", {})
    rows.append(("prefill 4 × 1024: ≥ 50% of the tensor-core rate", f"{p['seconds'] * 1e3:.0f} ms", f"{pf * 1e3:.1f} ms (tc)",
                 f"{100 * pf / p['seconds']:.0f}%", f"{hp['seconds'] * 1e3:.0f} ms" if "seconds" in hp else "—",
                 f"{hp['seconds'] / p['seconds']:.2f}×" if "seconds" in hp else "—", pf / p["seconds"] >= 0.5))
    if interp:
        both = interp.get("both")
        rows.append(("64 rows' own steering + capture of every layer's resid_post, batch 64: within 5% of plain",
                     f"capture {interp.get('capture', float('nan')):.3f}, steering {interp.get('steering', float('nan')):.3f}, "
                     f"both {both:.3f} of plain" if both else "—", "", "", "—", "—", bool(both and both >= 0.95)))
    if "workspace_bytes" in k:
        rows.append(("memory: weights + KV cache + a bounded workspace",
                     f"peak {k['peak_bytes'] / 1e9:.1f} GB", f"weights {k['weight_bytes'] / 1e9:.1f} GB + workspace "
                     f"{k['workspace_bytes'] / 1e9:.2f} GB + KV {k['kv_bytes_per_token']} B/token", "", "—", "—", None))
    return rows


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
        interp = interp_ratios(os.path.join(d, f"interp-{fmt}.txt"))
        print("| target | kscope | floor | fraction | HF | vs HF | met |")
        print("|---|---:|---:|---:|---:|---:|:---:|")
        for t in targets(k, h, interp):
            met = "—" if t[6] is None else ("yes" if t[6] else "no")
            print("| " + " | ".join(t[:6]) + f" | {met} |")
        print()
        print("| measure | kscope (alone / queued) | floor | of floor | HF | speed-up over HF |")
        print("|---|---:|---:|---:|---:|---:|")
        hm = {r["tokens"]: r for r in h.get("moe", [])}
        for r in k["moe"]:
            fl = max(r["bw_floor"], r["tc_floor"])
            hr = hm.get(r["tokens"], {})
            hs = f"{hr['seconds'] * 1e6:.0f} µs" if "seconds" in hr else hr.get("error", "—")[:40]
            ratio = f"{hr['seconds'] / r['seconds']:.2f}×" if "seconds" in hr else "—"
            bound = "bw" if r["bw_floor"] >= r["tc_floor"] else "tc"
            q = r.get("seconds_queued")
            qs = f" / {q * 1e6:.0f} µs" if q else ""
            qf = f" / {pct(fl / q)}" if q else ""
            print(f"| MoE block, {r['tokens']} tok ({r['experts']} experts) | {r['seconds'] * 1e6:.0f} µs{qs} | "
                  f"{fl * 1e6:.0f} µs ({bound}) | {pct(fl / r['seconds'])}{qf} | {hs} | {ratio} |")
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
