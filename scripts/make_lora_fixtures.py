#!/usr/bin/env python3
"""Regenerates fixtures/lora/: a PEFT LoRA adapter on the committed fixtures/qwen2-small model
and what PEFT + torch compute with it, for tests/tests/lora_peft.rs.

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors peft
    .venv/bin/python scripts/make_lora_fixtures.py

- adapter/: `PeftModel.save_pretrained` of LoraConfig(r=4, lora_alpha=8, all seven
  projections) with fixed A and B drawn from torch.manual_seed(1) (B non-zero, so the adapter
  changes the logits).
- parity.json: logits of one sequence; the completion-only loss of the SFT parity examples
  (prompt labels -100, right padding) and three AdamW steps on the adapter weights only
  (decay on every adapter matrix, clip_grad_norm_ over them), with the loss and gradient
  norm of each step.
- grads.safetensors: the adapter gradients of the first batch (PEFT key names and layout).
- after.safetensors: the adapter weights after the three steps.
"""
import json
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "fixtures", "qwen2-small")
OUT = os.path.join(ROOT, "fixtures", "lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The SFT parity examples (fixtures/sft/parity.json): (prompt, completion) ids, vocab 96.
EXAMPLES = [
    ([5, 17, 3, 88, 42], [9, 60, 2]),
    ([1, 2, 3], [44, 2]),
    ([95, 33, 14, 14, 70, 31, 8], [12, 13, 50, 77, 2]),
]
LOGIT_TOKENS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
PAD = 0
LR = 1e-2
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


def adapter_state(model, grads=False):
    """name → tensor, with PEFT's saved key names (no adapter name)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        key = name.replace(".default", "")
        t = p.grad if grads else p
        out[key] = t.detach().clone().contiguous()
    return out


def main():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    os.makedirs(OUT, exist_ok=True)
    adapter_dir = os.path.join(OUT, "adapter")
    model.save_pretrained(adapter_dir)
    os.remove(os.path.join(adapter_dir, "README.md"))  # PEFT's model-card boilerplate
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "fixtures/qwen2-small"  # not this machine's absolute path
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)

    model.train()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([LOGIT_TOKENS])).logits[0]
    ids, mask, labels = batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if step == 0:
            save_file(adapter_state(model, grads=True), os.path.join(OUT, "grads.safetensors"))
        norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    save_file(adapter_state(model), os.path.join(OUT, "after.safetensors"))

    out = {
        "model": "fixtures/qwen2-small",
        "adapter": "fixtures/lora/adapter",
        "logit_tokens": LOGIT_TOKENS,
        "logits": logits.tolist(),
        "examples": [{"prompt": p, "completion": c} for p, c in EXAMPLES],
        "pad_id": PAD,
        "train": {"lr": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, "losses": losses, "grad_norms": norms},
    }
    with open(os.path.join(OUT, "parity.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "logits"}))


if __name__ == "__main__":
    main()
