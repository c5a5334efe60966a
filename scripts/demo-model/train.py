#!/usr/bin/env python3
"""Train kscope's embedded demo model: a small DeepseekV3ForCausalLM on Debian man pages in four languages.

Runs on the device (PyTorch, HF transformers 5.17, tokenizers). Input: the corpus made here by
scripts/demo-model/prepare_corpus.sh ({en,fr,de,es}.txt.gz). Output directory:
  config.json, model.safetensors, tokenizer.json, tokenizer_config.json   the checkpoint (BF16)
  loss.csv, loss.png, samples.txt, train.json                             the card's material
  golden/{bf16,fp8,int4}.safetensors                                      HF outputs for kscope's parity tests

Everything is seeded: the same corpus and command give the same model on the same software (GPU kernels may
still differ in their last bits across devices).
"""
import argparse
import gzip
import json
import math
import os
import random
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
from make_fixtures import fp8_quantize, int4_quantize, is_linear_weight  # noqa: E402  (same quantizers as the fixtures)

LANGS = ["en", "fr", "de", "es"]
# DeepSeek-V3's pre-tokenizer, byte for byte as its tokenizer.json spells it (kscope checks the strings).
SPLITS = ["\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
          "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"]
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
            "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
            "<｜tool▁sep｜>", "<think>", "</think>"]
SAMPLE_PROMPTS = {
    "en": ["The following options are available:", "This manual page documents", "If the file does not exist,"],
    "fr": ["Les options suivantes sont disponibles :", "Cette page de manuel documente", "Si le fichier n'existe pas,"],
    "de": ["Die folgenden Optionen sind verfügbar:", "Diese Handbuchseite beschreibt", "Wenn die Datei nicht existiert,"],
    "es": ["Las siguientes opciones están disponibles:", "Esta página de manual documenta", "Si el archivo no existe,"],
}


def read_pages(corpus):
    pages = {}
    for lang in LANGS:
        with gzip.open(os.path.join(corpus, f"{lang}.txt.gz"), "rt", encoding="utf-8", errors="replace") as f:
            pages[lang] = [p.strip() for p in f.read().split("\f") if len(p.strip()) > 200]
    return pages


def train_tokenizer(pages, vocab, out):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [p for lang in LANGS for p in pages[lang]]
    tok.train_from_iterator(texts, trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "pad_token": SPECIALS[2], "add_bos_token": True,
           "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024,
           "kscope_chat_format": "deepseek-v3", "clean_up_tokenization_spaces": False}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return tok


def model_config(vocab):
    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=1024, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        rope_interleave=True, initializer_range=0.02)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-seconds", type=float, default=0, help="stop training early past this (safety net; recorded)")
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="aux-loss-free balancing step for the router bias")
    args = ap.parse_args()
    os.makedirs(os.path.join(args.out, "golden"), exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.time()

    pages = read_pages(args.corpus)
    tok = train_tokenizer(pages, args.vocab, args.out)
    vocab = tok.get_vocab_size()
    print(f"tokenizer: {vocab} tokens; pages " + ", ".join(f"{l} {len(pages[l])}" for l in LANGS), flush=True)
    eos = tok.token_to_id(SPECIALS[1])
    data = {}
    for lang in LANGS:
        ids = []
        for enc in tok.encode_batch(pages[lang]):
            ids.extend(enc.ids + [eos])
        data[lang] = torch.tensor(ids, dtype=torch.int32)
    tokens = {l: len(v) for l, v in data.items()}
    print("tokens per language:", tokens, flush=True)
    # held-out tail of each language for validation
    val = {l: v[-args.seq * 64:] for l, v in data.items()}
    data = {l: v[:-args.seq * 64] for l, v in data.items()}

    cfg = model_config(vocab)
    model = DeepseekV3ForCausalLM(cfg).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    # aux-loss-free balancing: record each MoE layer's chosen experts, nudge its correction bias after each step
    loads = {}

    def router_hook(i):
        def f(mod, inp, out):
            idx = out[2] if isinstance(out, tuple) and len(out) >= 3 else out[0]
            loads[i] = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts).float()
        return f

    gates = {}
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            gates[i] = layer.mlp.gate
            layer.mlp.gate.register_forward_hook(router_hook(i))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    g = torch.Generator().manual_seed(args.seed)
    per_lang = args.batch // len(LANGS)

    def batch_from(src):
        xs = []
        for lang in LANGS:
            v = src[lang]
            starts = torch.randint(0, len(v) - args.seq - 1, (per_lang,), generator=g)
            xs.extend(v[s:s + args.seq + 1] for s in starts.tolist())
        return torch.stack(xs).long().to(dev)

    log = []
    t0 = time.time()
    steps_run = 0
    for step in range(args.steps):
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"time budget reached at step {step}", flush=True)
            break
        steps_run = step + 1
        x = batch_from(data)
        with torch.autocast(device_type="cuda" if dev == "cuda" else "cpu", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x, use_cache=False)  # transformers shifts the labels itself
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for i, gate in gates.items():
                if i in loads:
                    l = loads[i]
                    gate.e_score_correction_bias += args.bias_rate * torch.sign(l.mean() - l).to(gate.e_score_correction_bias.device)
        if step % 50 == 0 or step == args.steps - 1:
            imb = max((loads[i].max() / loads[i].mean()).item() for i in loads) if loads else 0
            log.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0], "max_load_ratio": imb,
                        "seconds": time.time() - t0})
            print(f"step {step} loss {loss.item():.3f} max/mean expert load {imb:.2f} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0

    model.eval()
    with torch.no_grad():
        vl = {}
        for lang in LANGS:
            v = val[lang][: args.seq * 64 + 1].long().to(dev)
            xs = torch.stack([v[i * args.seq:(i + 1) * args.seq + 1] for i in range(63)])
            with torch.autocast(device_type="cuda" if dev == "cuda" else "cpu", dtype=torch.bfloat16):
                vl[lang] = model(input_ids=xs, labels=xs, use_cache=False).loss.item()
    print("validation loss:", vl, flush=True)

    # samples
    model_bf16 = model.to(torch.bfloat16)
    model_bf16.generation_config.pad_token_id = 2
    lines = []
    for lang, ps in SAMPLE_PROMPTS.items():
        for p in ps:
            ids = torch.tensor([tok.encode(p).ids], device=dev)
            torch.manual_seed(args.seed)
            outg = model_bf16.generate(ids, max_new_tokens=48, do_sample=True, temperature=0.7, top_k=40)
            lines.append(f"[{lang}] {p}{tok.decode(outg[0, ids.shape[1]:].tolist())}")
    with open(os.path.join(args.out, "samples.txt"), "w") as f:
        f.write("\n\n".join(lines) + "\n")
    print("\n".join(lines[:4]), flush=True)

    # the checkpoint, BF16, hub tensor names
    model_bf16.save_pretrained(args.out, max_shard_size="12MB")
    with open(os.path.join(args.out, "loss.csv"), "w") as f:
        f.write("step,loss,lr,max_load_ratio,seconds\n")
        for r in log:
            f.write(f"{r['step']},{r['loss']:.5f},{r['lr']:.6g},{r['max_load_ratio']:.4f},{r['seconds']:.2f}\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in log], [r["loss"] for r in log])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("kscope demo model on man pages (en, fr, de, es)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "loss.png"), dpi=110)
    except Exception as e:  # noqa: BLE001
        print("no plot:", e)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"steps": args.steps, "steps_run": steps_run, "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
                   "bias_rate": args.bias_rate, "params": n_params, "tokens": tokens, "train_seconds": train_s,
                   "final_loss": log[-1]["loss"], "validation_loss": vl, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
                   "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                   "total_seconds": time.time() - t_start}, f, indent=2)

    # golden outputs: HF in fp32 on the CPU, from exactly the stored (dequantized) values
    sd = {}
    for fn in os.listdir(args.out):
        if fn.endswith(".safetensors") and fn.startswith("model"):
            sd.update(load_file(os.path.join(args.out, fn)))
    texts = ["The following options are available:", "Les options suivantes sont disponibles :",
             "Diese Handbuchseite beschreibt das Programm", "Si el archivo no existe, se crea uno nuevo."]
    prompts = [torch.tensor(tok.encode(t).ids) for t in texts]
    for fmt in ["bf16", "fp8", "int4"]:
        deq = {}
        for n, t in sd.items():
            w = t.float()
            if fmt == "fp8" and is_linear_weight(n):
                w = fp8_quantize(w)[2]
            if fmt == "int4" and is_linear_weight(n) and ".mlp.experts." in n:
                w = int4_quantize(w)[3]
            deq[n] = w.contiguous()
        tmp = os.path.join(args.out, "golden", "tmp")
        os.makedirs(tmp, exist_ok=True)
        save_file(deq, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        c = json.load(open(os.path.join(args.out, "config.json")))
        c["dtype"] = "float32"
        json.dump(c, open(os.path.join(tmp, "config.json"), "w"))
        m, info = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                                        output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise SystemExit(f"golden model did not load every tensor: {bad}")
        m.eval()
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 2
        golden = {}
        for i, p in enumerate(prompts):
            with torch.no_grad():
                gen = m.generate(p[None], max_new_tokens=12, do_sample=False)
                full = gen[0]
                logits = m(full[None]).logits[0].float()
            golden[f"seq{i}.prompt"] = p.to(torch.int32)
            golden[f"seq{i}.greedy"] = full[len(p):].to(torch.int32)
            golden[f"seq{i}.ids"] = full.to(torch.int32)
            golden[f"seq{i}.logits"] = logits[len(p) - 1:].contiguous()  # rows predicting the greedy tokens
        save_file(golden, os.path.join(args.out, "golden", f"{fmt}.safetensors"), metadata={"format": "kscope-golden"})
        for fn in os.listdir(tmp):
            os.remove(os.path.join(tmp, fn))
        os.rmdir(tmp)
        print(f"golden {fmt}: greedy {[tok.decode(golden[f'seq{i}.greedy'].tolist()) for i in range(2)]}", flush=True)
    print(f"done in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
