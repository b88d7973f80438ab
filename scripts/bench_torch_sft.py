#!/usr/bin/env python3
"""The torch + transformers side of `cargo xtask bench sft`: whole SFT optimiser steps at the
same shapes — loss on the second half of each sequence (prompt half labelled -100), backward,
clip_grad_norm_(1.0), torch.optim.AdamW — random weights, CPU, as many threads as cores.

    .venv/bin/python scripts/bench_torch_sft.py [--quick] [--shapes tiny,smollm2-135m]
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from bench_torch_model import SHAPES


def sft_rate(model, batch, seq, steps):
    ids = torch.tensor([[(i * 31 + b * 7) % 500 + 3 for i in range(seq + 1)] for b in range(batch)])
    inputs = ids[:, :seq]
    labels = ids[:, :seq].clone()
    # Our inputs drop each sequence's last token and predict completion tokens; transformers
    # shifts labels itself, so label the positions whose token is a completion token.
    labels[:, : seq // 2] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch * seq / statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="tiny,smollm2-135m")
    ap.add_argument("--out", default="bench-torch-sft.json")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    batch, seq, steps = (2, 128, 2) if a.quick else (4, 256, 3)
    figures = []
    for name in a.shapes.split(","):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(SHAPES[name](), dtype=torch.float32).train()
        figures.append((f"model/{name}/sft step {batch}x{seq}", sft_rate(model, batch, seq, steps), "tokens/s"))
        figures.append((f"model/{name}/peak RSS so far", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB"))
        del model
    for n, v, u in figures:
        print(f"{n:<48} {v:>12.2f} {u}")
    report = {"suite": "sft", "backend": f"torch {torch.__version__}", "cores": os.cpu_count(),
              "figures": [{"name": n, "value": v, "unit": u} for n, v, u in figures]}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
