#!/usr/bin/env python3
"""Regenerates fixtures/sft/parity.json: the completion-only SFT loss and three optimiser
steps computed by transformers + torch on the committed fixtures/qwen2-small model.

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
    .venv/bin/python scripts/make_sft_fixtures.py

The loss is transformers' own: `model(input_ids, attention_mask, labels).loss` with the
prompt (and padding) labelled -100, right padding. The steps are what the HF Trainer does:
`clip_grad_norm_` over all parameters, then torch.optim.AdamW with weight decay on
matrices only (norms and biases in a no-decay group), constant learning rate.
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "fixtures", "qwen2-small")
OUT = os.path.join(ROOT, "fixtures", "sft", "parity.json")

# (prompt, completion) token ids, vocab 96. Different lengths, so padding is exercised.
# No real token is the pad id 0: transformers builds the embedding with
# `padding_idx = pad_token_id`, which zeroes that row's gradient even where id 0 is a real
# token; our trainer does not special-case it (Qwen2.5 configs name no pad token).
EXAMPLES = [
    ([5, 17, 3, 88, 42], [9, 60, 2]),
    ([1, 2, 3], [44, 2]),
    ([95, 33, 14, 14, 70, 31, 8], [12, 13, 50, 77, 2]),
]
PAD = 0
LR = 1e-3
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 0.5
STEPS = 3


def batch():
    seqs = [p + c for p, c in EXAMPLES]
    width = max(len(s) for s in seqs)
    ids, mask, labels = [], [], []
    for (p, c), s in zip(EXAMPLES, seqs):
        pad = width - len(s)
        ids.append(s + [PAD] * pad)
        mask.append([1] * len(s) + [0] * pad)
        labels.append([-100] * len(p) + c + [-100] * pad)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def main():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.train()  # no dropout in Qwen2 configs with attention_dropout 0
    ids, mask, labels = batch()
    with torch.no_grad():
        loss0 = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.999), eps=1e-8,
    )
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    out = {
        "model": "fixtures/qwen2-small",
        "examples": [{"prompt": p, "completion": c} for p, c in EXAMPLES],
        "pad_id": PAD,
        "loss": loss0,
        "train": {
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "max_grad_norm": MAX_GRAD_NORM,
            "losses": losses,
            "grad_norms": norms,
            "loss_after": after,
        },
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
