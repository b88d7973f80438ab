#!/usr/bin/env python3
"""The torch + transformers side of `cargo xtask bench gpu`: the qwen2.5-1.5b shape with random
weights on one CUDA device, in f32 and bf16. It measures prefill (1x512, 16x512), `generate`
greedy decode at batch 1/16/64, and one training step (loss on the second half of each
sequence, backward, clip, AdamW), with peak GPU memory for each. Run it in the same device
call as ours so the ratios are taken side by side (the device image has torch and
transformers preinstalled):

    python3 scripts/bench_torch_gpu.py [--quick] [--out torch-gpu.json]
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

PEAK_BF16_FLOPS = 989e12


def hbm_bytes_per_sec():
    """The H200's HBM3e bandwidth when torch names that card, else the H100 SXM's HBM3."""
    return 4.8e12 if "H200" in torch.cuda.get_device_name() else 3.35e12


def config():
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True)


def timed(fn, reps):
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure(dtype, label, quick, figures):
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: on the host it takes minutes at 1.5B
        model = AutoModelForCausalLM.from_config(config(), dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    bytes_per_param = torch.finfo(dtype).bits / 8
    reps = 2 if quick else 4

    def fig(what, value, unit):
        figures.append({"name": f"torch/qwen2.5-1.5b/{label}/{what}", "value": value, "unit": unit})

    for batch in (1, 16):
        ids = torch.tensor([[(i * 31 + b) % 50000 + 3 for i in range(512)] for b in range(batch)], device="cuda")
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            t = timed(lambda: model.model(input_ids=ids), reps)
        fig(f"prefill {batch}x512", batch * 512 / t, "tokens/s")
        fig(f"peak GPU memory, prefill {batch}x512", torch.cuda.max_memory_allocated() / 2**20, "MiB")

    steps = 16 if quick else 64
    for batch in (1, 16, 64):
        ids = torch.tensor([[100 + b + i for i in range(32)] for b in range(batch)], device="cuda")
        mask = torch.ones_like(ids)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            def run(n):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)
            run(4)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(1)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            run(steps + 1)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
        rate = batch * steps / max(total - prefill, 1e-9)
        fig(f"generate decode batch {batch}", rate, "tokens/s")
        fig(f"peak GPU memory, decode batch {batch}", torch.cuda.max_memory_allocated() / 2**20, "MiB")
        if batch == 1:
            bound = hbm_bytes_per_sec() / (params * bytes_per_param)
            fig("decode batch 1 share of HBM bound", 100 * rate / bound, "%")

    del model
    torch.cuda.empty_cache()
    batch, seq = (1, 256) if quick else (4, 512)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config(), dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.tensor([[(i * 31 + b * 7) % 50000 + 3 for i in range(seq)] for b in range(batch)], device="cuda")
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # loss on the second half, as ours

    def step():
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t = timed(step, reps)
    fig(f"train step {batch}x{seq}", batch * seq / t, "tokens/s")
    fig(f"train step {batch}x{seq} MFU", 100 * 6 * params * batch * seq / t / PEAK_BF16_FLOPS, "%")
    fig(f"peak GPU memory, train step {batch}x{seq}", torch.cuda.max_memory_allocated() / 2**20, "MiB")
    del model, opt
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="torch-gpu.json")
    args = p.parse_args()
    figures = []
    for dtype, label in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        measure(dtype, label, args.quick, figures)
    for f in figures:
        print(f"{f['name']:<64} {f['value']:>12.2f} {f['unit']}")
    with open(args.out, "w") as fh:
        json.dump({"suite": "torch-gpu", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                   "figures": figures}, fh, indent=1)


if __name__ == "__main__":
    main()
