#!/usr/bin/env python3
"""The torch + transformers side of `cargo xtask bench model`: same shapes, same measurements,
random weights (no download), CPU, as many threads as cores. Run both on one machine and take
the ratio.

    .venv/bin/python scripts/bench_torch_model.py [--quick] [--shapes smollm2-135m,qwen2.5-1.5b] [--context 2048,4096]
"""
import argparse
import json
import os
import resource
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

SHAPES = {
    "tiny": lambda: Qwen2Config(vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                                tie_word_embeddings=True),
    "smollm2-135m": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2.5-1.5b": lambda: Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def prefill_rate(model, n, reps):
    ids = torch.tensor([[(i * 7919) % 1000 + 10 for i in range(n)]])
    with torch.no_grad():
        model.model(input_ids=ids[:, :16])
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            h = model.model(input_ids=ids).last_hidden_state
            model.lm_head(h[:, -1:])
            best = min(best, time.perf_counter() - t)
    return n / best


def decode_rate(model, batch, steps, prompt_len=32):
    # Same as ours: left-padded prompts of slightly different lengths, then greedy steps.
    lens = [max(prompt_len - b % 4, 1) for b in range(batch)]
    width = max(lens)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, width - n:] = (100 + torch.arange(n) * 7 + b) % 1000 + 10
        mask[b, width - n:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return batch * steps / (time.perf_counter() - t)


def train_rate(model, n):
    ids = torch.tensor([[(i * 31) % 500 + 3 for i in range(n)]])
    best = float("inf")
    # Best of 4 at short lengths (a pass takes about a second; the first pays one-time
    # allocations), of 2 at long ones: as xtask's `train_rate`.
    for _ in range(4 if n <= 512 else 2):
        t = time.perf_counter()
        logits = model(input_ids=ids).logits
        lp = torch.log_softmax(logits.float(), -1)[0, :-1].gather(1, ids[0, 1:, None])
        (-lp.mean()).backward()
        best = min(best, time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return n / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes")
    ap.add_argument("--out", default="bench-torch.json")
    ap.add_argument("--context", help="comma-separated prompt lengths: prefill 1xL, decode b1/b8 after L tokens, train fwd+bwd 1xL")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    shapes = a.shapes or ("tiny,smollm2-135m" if a.quick else "smollm2-135m,qwen2.5-1.5b")
    prefill, steps = (128, 8) if a.quick else (512, 16)
    figures = []
    for name in shapes.split(","):
        torch.manual_seed(0)
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_config(SHAPES[name](), dtype=torch.float32).eval()
        figures.append((f"model/{name}/init", time.perf_counter() - t, "s"))
        params = sum(p.numel() for p in model.parameters())
        if a.context:
            for n in (int(x) for x in a.context.split(",")):
                figures.append((f"model/{name}/prefill 1x{n}", prefill_rate(model, n, 2), "tokens/s"))
                for b in (1, 8):
                    figures.append((f"model/{name}/decode batch {b} @ {n}", decode_rate(model, b, steps, n), "tokens/s"))
                figures.append((f"model/{name}/peak RSS so far", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB"))
            if params < 5e8:
                model.train()
                for n in (int(x) for x in a.context.split(",")):
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    figures.append((f"model/{name}/train fwd+bwd 1x{n}", train_rate(model, n), "tokens/s"))
                    figures.append((f"model/{name}/peak RSS after train 1x{n} (was {before:.0f})", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB"))
            del model
            continue
        figures.append((f"model/{name}/prefill 1x{prefill}", prefill_rate(model, prefill, 1 if params > 5e8 else 3), "tokens/s"))
        for b in (1, 8):
            figures.append((f"model/{name}/decode batch {b}", decode_rate(model, b, steps), "tokens/s"))
        if params < 5e8:
            model.train()
            figures.append((f"model/{name}/train fwd+bwd 1x128", train_rate(model, 64 if a.quick else 128), "tokens/s"))
            model.eval()
        figures.append((f"model/{name}/peak RSS so far", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB"))
        del model
    for n, v, u in figures:
        print(f"{n:<48} {v:>12.2f} {u}")
    report = {"suite": "model", "backend": f"torch {torch.__version__}", "cores": os.cpu_count(),
              "figures": [{"name": n, "value": v, "unit": u} for n, v, u in figures]}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
