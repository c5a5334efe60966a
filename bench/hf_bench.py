#!/usr/bin/env python3
"""HF transformers side of scripts/gpu/bench.sh: the same checkpoint, the same measurements as bench_gpu.

    python3 bench/hf_bench.py CHECKPOINT_DIR OUT.json

HF has no kimi_k2 class (the hub model runs remote code); the checkpoint is the DeepseekV3 architecture, so it is
loaded as DeepseekV3ForCausalLM from its own files with model_type rewritten in the config object only. BF16 in
torch.bfloat16; FP8 through HF's own fine-grained FP8 integration (the checkpoint's quantization_config). Each
measurement that fails (out of memory, a format HF cannot load) is recorded as an error, not skipped silently.
"""
import json
import sys
import time

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def timed(fn, reps, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    d, out_path = sys.argv[1], sys.argv[2]
    out = {"transformers": transformers.__version__, "torch": torch.__version__}
    with open(f"{d}/config.json") as f:
        cd = json.load(f)
    cd["model_type"] = "deepseek_v3"
    cfg = DeepseekV3Config.from_dict(cd)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        model = DeepseekV3ForCausalLM.from_pretrained(d, config=cfg, dtype=torch.bfloat16, device_map="cuda")
    except Exception as e:  # noqa: BLE001 - recorded
        out["error"] = f"load: {type(e).__name__}: {e}"[:500]
        print(out["error"])
        json.dump(out, open(out_path, "w"), indent=1)
        return
    torch.cuda.synchronize()
    out["load_seconds"] = time.time() - t0
    out["experts_implementation"] = str(getattr(model.config, "_experts_implementation", None))
    out["attn_implementation"] = str(getattr(model.config, "_attn_implementation", None))
    print(f"HF {transformers.__version__} loaded in {out['load_seconds']:.1f} s "
          f"(experts: {out['experts_implementation']}, attention: {out['attn_implementation']})")
    model.eval()
    H = cfg.hidden_size
    moe_layer = next(i for i, l in enumerate(model.model.layers) if hasattr(l.mlp, "gate") and hasattr(l.mlp, "experts"))
    mlp = model.model.layers[moe_layer].mlp
    out["moe"] = []
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for T in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]:
            x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, generator=g)
            try:
                s = timed(lambda: mlp(x), 50 if T <= 256 else 20)
                out["moe"].append({"tokens": T, "seconds": s})
                print(f"moe T={T}: {s * 1e6:.1f} us")
            except Exception as e:  # noqa: BLE001
                out["moe"].append({"tokens": T, "error": f"{type(e).__name__}: {e}"[:300]})
                torch.cuda.empty_cache()
        out["decode"] = []
        V = cfg.vocab_size
        for B in [1, 16, 64, 128, 256]:
            try:
                ids = torch.randint(3, V, (B, 16), device="cuda", generator=g)
                o = model(ids, use_cache=True, logits_to_keep=1)
                pkv = o.past_key_values
                nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                ts = []
                for _ in range(16):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    o = model(nxt, past_key_values=pkv, use_cache=True)
                    pkv = o.past_key_values
                    nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                ts.sort()
                st = ts[len(ts) // 2]
                out["decode"].append({"batch": B, "step_seconds": st, "tokens_per_s": B / st})
                print(f"decode B={B}: {st * 1e3:.2f} ms/step, {B / st:.1f} tok/s")
                del pkv, o
            except Exception as e:  # noqa: BLE001
                out["decode"].append({"batch": B, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"decode B={B}: {type(e).__name__}")
            torch.cuda.empty_cache()
        try:
            ids = torch.randint(3, V, (4, 1024), device="cuda", generator=g)
            s = timed(lambda: model(ids, use_cache=False, logits_to_keep=1), 3, warm=1)
            out["prefill"] = {"batch": 4, "tokens": 1024, "seconds": s, "tokens_per_s": 4096 / s}
            print(f"prefill 4x1024: {s * 1e3:.1f} ms")
        except Exception as e:  # noqa: BLE001
            out["prefill"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    out["peak_bytes"] = torch.cuda.max_memory_allocated()
    json.dump(out, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
