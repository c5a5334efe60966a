#!/usr/bin/env python3
"""Write kscope's reference-parity fixtures with HF transformers as the numerical reference.

For each of two architectures (a Kimi-K2-shaped and a DeepSeek-V3-shaped tiny model) and each of three
storage formats (BF16, DeepSeek-V3 FP8 128x128 block, compressed-tensors pack-quantized INT4) this writes

  <name>/config.json              the config as it would ship (Kimi: hub dialect, model_type kimi_k2;
                                  DeepSeek: the transformers-5 dialect written by save_pretrained)
  <name>/model*.safetensors       weights in the stored format (Kimi: two shards + index.json)
  <name>/golden.safetensors       HF outputs, fp32, computed on CPU from exactly the stored values
                                  (quantized formats: on the exactly dequantized weights)
  <name>/golden.json              provenance: versions, sequence lengths, what each tensor is

Golden tensors, per sequence i:
  seq{i}.prompt      I32 [T]            random prompt ids
  seq{i}.greedy      I32 [N]            HF generate(do_sample=False) continuation of the prompt alone
  seq{i}.ids         I32 [T+N]          prompt + greedy
  seq{i}.logits      F32 [T+N, V]       one forward over ids
  seq{i}.hidden      F32 [L+1, T+N, H]  hidden[l] = input of layer l (l < L); hidden[L] = output of the last layer
  seq{i}.attn_out    F32 [L, T+N, H]    self_attn output (after o_proj) of each layer
  seq{i}.mlp_out     F32 [L, T+N, H]    dense MLP / MoE output of each layer
  seq{i}.final_norm  F32 [T+N, H]       model.norm output

Run on the device:  python3 scripts/reference/make_fixtures.py --out DIR
It also writes DIR/hf_source.txt with the transformers sources it ran (the semantics we match).
"""
import argparse
import copy
import inspect
import json
import math
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

VOCAB = 512
SEQ_LENS = [1, 6, 17, 40]
N_NEW = 10


def kimi_config_hub():
    # Kimi-K2 shaped: q_lora, one group, one dense layer, hub dialect (rope_scaling + top-level rope_theta).
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",  # renamed to kimi_k2 in the shipped file; HF has no kimi_k2 class
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 160,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "kv_lora_rank": 64,
        "max_position_embeddings": 2048,
        "moe_intermediate_size": 64,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": 96,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 64,
            "type": "yarn",
        },
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 32,
        "vocab_size": VOCAB,
    }


def dsv3_config_kwargs():
    # DeepSeek-V3 shaped: q_lora null, grouped routing, two dense layers, two shared experts, mscale != mscale_all_dim.
    return dict(
        vocab_size=VOCAB,
        hidden_size=192,
        intermediate_size=192,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=2,
        n_routed_experts=16,
        routed_scaling_factor=2.5,
        kv_lora_rank=64,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        first_k_dense_replace=2,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.9,
            "mscale_all_dim": 0.8,
            "original_max_position_embeddings": 64,
        },
        rope_interleave=True,
    )


def is_linear_weight(name):
    return name.endswith(".weight") and ("_proj." in name) and name.startswith("model.layers.")


def randomize(sd, gen):
    """Replace every tensor by random values that keep signals alive through the tiny model."""
    out = {}
    for name, t in sd.items():
        shape = tuple(t.shape)
        if name.endswith("e_score_correction_bias"):
            v = torch.randn(shape, generator=gen) * 0.1
        elif "norm" in name:  # input/post-attention, q_a/kv_a layernorms, final norm: non-unit weights
            v = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            v = torch.randn(shape, generator=gen)
        elif len(shape) == 2:
            v = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        else:
            raise SystemExit(f"unexpected tensor {name} {shape}")
        out[name] = v.float()
    return out


def round_bf16(t):
    return t.to(torch.bfloat16).float()


# ---------------------------------------------------------------------------------------------- formats
def fp8_quantize(w, block=128):
    """DeepSeek-V3 FP8: e4m3 weight + fp32 weight_scale_inv per 128x128 block (edge blocks partial)."""
    out_f, in_f = w.shape
    nb_o, nb_i = math.ceil(out_f / block), math.ceil(in_f / block)
    scale = torch.empty(nb_o, nb_i, dtype=torch.float32)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    deq = torch.empty_like(w)
    for bo in range(nb_o):
        for bi in range(nb_i):
            blk = w[bo * block:(bo + 1) * block, bi * block:(bi + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            qb = (blk / s).to(torch.float8_e4m3fn)
            scale[bo, bi] = s
            q[bo * block:(bo + 1) * block, bi * block:(bi + 1) * block] = qb
            deq[bo * block:(bo + 1) * block, bi * block:(bi + 1) * block] = qb.float() * s
    return q, scale, deq


def int4_quantize(w, group=32):
    """compressed-tensors pack-quantized, symmetric int4, group 32 along the input dim."""
    out_f, in_f = w.shape
    assert in_f % group == 0
    g = w.view(out_f, in_f // group, group)
    scale = (g.abs().amax(dim=-1) / 7.5).clamp(min=1e-8).to(torch.bfloat16)  # stored as bf16
    s = scale.float().unsqueeze(-1)
    q = torch.clamp(torch.round(g / s), -8, 7).to(torch.int8)
    deq = (q.float() * s).view(out_f, in_f)
    qv = (q.view(out_f, in_f).to(torch.int32) + 8)  # unsigned nibbles
    pad = (-in_f) % 8
    if pad:
        qv = torch.nn.functional.pad(qv, (0, pad))
    qv = qv.view(out_f, -1, 8)
    shifts = torch.arange(8, dtype=torch.int32) * 4
    packed = (qv << shifts).sum(dim=-1, dtype=torch.int64)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed, scale, torch.tensor([out_f, in_f], dtype=torch.int32), deq


INT4_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


def int4_targets(name):
    # routed experts only, as in Kimi-K2-Thinking (the ignore list above keeps attention, shared and dense MLPs in bf16)
    return is_linear_weight(name) and ".mlp.experts." in name


def fp8_targets(name):
    # every linear of the decoder layers except the router (mlp.gate.weight stays bf16), as in DeepSeek-V3
    return is_linear_weight(name)


def make_variants(sd_f32, bf16_overrides):
    """Return {fmt: (stored tensors, dequantized fp32 tensors, quantization_config or None)}."""
    res = {}
    # bf16: most tensors bf16; overrides pick other stored dtypes (f32 norms, f16 embeddings, ...)
    stored, deq = {}, {}
    for n, t in sd_f32.items():
        dt = bf16_overrides(n)
        stored[n] = t.to(dt).contiguous()
        deq[n] = stored[n].float()
    res["bf16"] = (stored, deq, None)
    base = {n: deq[n] for n in deq}  # quantize from the bf16 values

    stored, deq = {}, {}
    for n, t in base.items():
        if fp8_targets(n):
            q, s, d = fp8_quantize(t)
            stored[n] = q
            stored[n[: -len(".weight")] + ".weight_scale_inv"] = s
            deq[n] = d
        else:
            stored[n] = sd_f32[n].to(bf16_overrides(n)).contiguous()
            deq[n] = stored[n].float()
    res["fp8"] = (stored, deq, {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})

    stored, deq = {}, {}
    for n, t in base.items():
        if int4_targets(n):
            p, s, shp, d = int4_quantize(t)
            stem = n[: -len(".weight")]
            stored[stem + ".weight_packed"] = p
            stored[stem + ".weight_scale"] = s
            stored[stem + ".weight_shape"] = shp
            deq[n] = d
        else:
            stored[n] = sd_f32[n].to(bf16_overrides(n)).contiguous()
            deq[n] = stored[n].float()
    res["int4"] = (stored, deq, {
        "config_groups": {"group_0": {
            "input_activations": None, "output_activations": None, "targets": ["Linear"],
            "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32,
                        "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                        "symmetric": True, "type": "int"}}},
        "format": "pack-quantized", "ignore": INT4_IGNORE, "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed"})
    return res


# ---------------------------------------------------------------------------------------------- golden
def load_hf(config_dict, deq, workdir):
    d = os.path.join(workdir, "hf_fp32")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    cfg = copy.deepcopy(config_dict)
    cfg.pop("quantization_config", None)
    cfg["model_type"] = "deepseek_v3"
    cfg["torch_dtype"] = "float32"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in deq.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"HF did not load every tensor: {bad}")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def run_golden(model, n_layers, gen):
    layers = model.model.layers
    rec = {}

    def pre(i):
        def f(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            rec.setdefault("in", {})[i] = h.detach().clone()
        return f

    def post(i):
        def f(mod, args, kwargs, out):
            h = out[0] if isinstance(out, tuple) else out
            rec.setdefault("out", {})[i] = h.detach().clone()
        return f

    def sub(key, i):
        def f(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            rec.setdefault(key, {})[i] = h.detach().clone()
        return f

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(post(i), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(sub("attn", i)))
        hooks.append(layer.mlp.register_forward_hook(sub("mlp", i)))
    hooks.append(model.model.norm.register_forward_hook(sub("norm", 0)))

    out = {}
    for si, T in enumerate(SEQ_LENS):
        prompt = torch.randint(3, VOCAB, (1, T), generator=gen)
        with torch.no_grad():
            g = model.generate(prompt, max_new_tokens=N_NEW, do_sample=False)
        greedy = g[0, T:]
        ids = g[:, : T + len(greedy)]
        rec.clear()
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        hidden = [rec["in"][l][0] for l in range(n_layers)] + [rec["out"][n_layers - 1][0]]
        # layer l's output is layer l+1's input: check HF's own consistency once
        for l in range(n_layers - 1):
            assert torch.equal(rec["out"][l][0], rec["in"][l + 1][0])
        out[f"seq{si}.prompt"] = prompt[0].to(torch.int32)
        out[f"seq{si}.greedy"] = greedy.to(torch.int32)
        out[f"seq{si}.ids"] = ids[0].to(torch.int32)
        out[f"seq{si}.logits"] = logits
        out[f"seq{si}.hidden"] = torch.stack(hidden).float()
        out[f"seq{si}.attn_out"] = torch.stack([rec["attn"][l][0] for l in range(n_layers)]).float()
        out[f"seq{si}.mlp_out"] = torch.stack([rec["mlp"][l][0] for l in range(n_layers)]).float()
        out[f"seq{si}.final_norm"] = rec["norm"][0][0].float()
        # greedy consistency: HF's cached decode agrees with the argmax of its full forward
        am = logits[T - 1:-1].argmax(-1)
        if not torch.equal(am, greedy):
            print(f"  note: seq{si} greedy differs from full-forward argmax at "
                  f"{(am != greedy).nonzero().flatten().tolist()}")
    for h in hooks:
        h.remove()
    return {k: v.contiguous() for k, v in out.items()}


def write_checkpoint(dirpath, config_dict, stored, shards):
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    names = sorted(stored)
    if shards == 1:
        save_file({n: stored[n] for n in names}, os.path.join(dirpath, "model.safetensors"), metadata={"format": "pt"})
        return
    # split by layer so each shard is self-contained per module, like the hub's shards
    parts = [[] for _ in range(shards)]
    for n in names:
        if n.startswith("model.layers."):
            li = int(n.split(".")[2])
            parts[min(li * shards // 3, shards - 1)].append(n)
        else:
            parts[0 if "embed" in n else shards - 1].append(n)
    weight_map, total = {}, 0
    for i, p in enumerate(parts):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: stored[n] for n in p}, os.path.join(dirpath, fn), metadata={"format": "pt"})
        for n in p:
            weight_map[n] = fn
            total += stored[n].numel() * stored[n].element_size()
    with open(os.path.join(dirpath, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def dump_sources(path):
    import transformers.modeling_rope_utils as ru
    import transformers.models.deepseek_v3.configuration_deepseek_v3 as cfgmod
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as mod
    with open(path, "w") as f:
        f.write(f"transformers {transformers.__version__} torch {torch.__version__}\n")
        for m in (mod, cfgmod):
            f.write(f"\n#### {m.__file__}\n")
            f.write(inspect.getsource(m))
        f.write("\n#### modeling_rope_utils._compute_yarn_parameters\n")
        f.write(inspect.getsource(ru._compute_yarn_parameters))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    dump_sources(os.path.join(args.out, "hf_source.txt"))
    work = tempfile.mkdtemp()

    archs = {}
    # Kimi-shaped, hub dialect
    kimi_hub = kimi_config_hub()
    archs["kimi"] = (kimi_hub, DeepseekV3Config.from_dict(copy.deepcopy(kimi_hub)), 2,
                     lambda n: torch.float16 if n == "model.embed_tokens.weight" else torch.bfloat16)
    # DeepSeek-shaped, transformers-5 dialect as save_pretrained writes it
    ds_cfg = DeepseekV3Config(**dsv3_config_kwargs())
    archs["dsv3"] = (None, ds_cfg, 1,
                     lambda n: torch.float32 if ("norm" in n or "e_score_correction_bias" in n) else torch.bfloat16)

    for ai, (arch, (hub_dict, cfg, shards, dtypes)) in enumerate(archs.items()):
        print(f"== {arch}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}", flush=True)
        torch.manual_seed(1234 + ai)
        m = DeepseekV3ForCausalLM(cfg)
        tmp = os.path.join(work, f"init_{arch}")
        m.save_pretrained(tmp)  # hub tensor names (per-expert)
        with open(os.path.join(tmp, "config.json")) as f:
            saved_cfg = json.load(f)
        sd = {}
        for fn in sorted(os.listdir(tmp)):
            if fn.endswith(".safetensors"):
                sd.update(load_file(os.path.join(tmp, fn)))
        gen = torch.Generator().manual_seed(42 + ai)
        sd = randomize(sd, gen)
        ship_cfg = copy.deepcopy(hub_dict) if hub_dict is not None else saved_cfg
        for fmt, (stored, deq, qcfg) in make_variants(sd, dtypes).items():
            name = f"{arch}_{fmt}"
            print(f"-- {name}: {len(stored)} tensors", flush=True)
            c = copy.deepcopy(ship_cfg)
            if qcfg is not None:
                c["quantization_config"] = qcfg
            model = load_hf(c, deq, work)
            golden = run_golden(model, cfg.num_hidden_layers, torch.Generator().manual_seed(7 + ai))
            if hub_dict is not None:
                c["model_type"] = "kimi_k2"
            d = os.path.join(args.out, name)
            write_checkpoint(d, c, stored, shards)
            save_file(golden, os.path.join(d, "golden.safetensors"), metadata={"format": "kscope-golden"})
            with open(os.path.join(d, "golden.json"), "w") as f:
                json.dump({
                    "made_by": "scripts/reference/make_fixtures.py",
                    "transformers": transformers.__version__, "torch": torch.__version__,
                    "device": "cpu", "dtype": "float32", "attn_implementation": "eager",
                    "format": fmt, "seq_lens": SEQ_LENS, "n_new": N_NEW,
                    "note": "golden computed by HF on the exact stored (dequantized) values",
                }, f, indent=2)
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
