#!/usr/bin/env python3
"""The peer's decode attention at Kimi-K2's attention shapes, for bench_gpu mla's sizes: HF transformers 5.17's
DeepseekV3Attention keeps expanded per-head keys [B, 64, T, 192] and values [B, 64, T, 128] in its DynamicCache
and calls torch's scaled_dot_product_attention (attn_implementation="sdpa") for the new token. This times that
call alone (bf16, CUDA events, median of 20) -- the same part of the layer as kscope's absorbed kernel (which
reads the compressed latent cache [B, T, 576] instead).
usage: hf_mla.py OUT.json"""
import json
import sys

import torch
import torch.nn.functional as F

sizes = [(1, 4096), (1, 32768), (8, 4096), (64, 1024), (64, 4096), (128, 4096), (256, 1024)]
nh, dqk, dv = 64, 192, 128
rows = []
print(f"{'batch':>6} {'context':>8} {'sdpa us':>10} {'cache GB':>9}")
for B, T in sizes:
    need = B * nh * T * (dqk + dv) * 2
    if need > 60e9:
        rows.append({"batch": B, "context": T, "error": f"expanded cache {need / 1e9:.0f} GB does not fit"})
        print(f"{B:>6} {T:>8} {'(no room)':>10} {need / 1e9:9.1f}")
        continue
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, nh, 1, dqk, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, nh, T, dqk, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, nh, T, dv, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = dqk ** -0.5
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        F.scaled_dot_product_attention(q, k, v, scale=scale)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    us = ts[len(ts) // 2]
    rows.append({"batch": B, "context": T, "sdpa_s": us / 1e6, "cache_bytes": need})
    print(f"{B:>6} {T:>8} {us:10.1f} {need / 1e9:9.2f}")
    del q, k, v
    torch.cuda.empty_cache()
json.dump({"torch": torch.__version__, "mla_sdpa": rows}, open(sys.argv[1], "w"), indent=2)
