#!/usr/bin/env python3
"""Checks an adapter trained by thinkjson against PEFT and a merged model against transformers.

    .venv/bin/pip install torch transformers safetensors peft
    X=target/release/xtask
    $X import-gguf --in smollm2-135m-instruct --out /tmp/base
    $X sft --model smollm2-135m-instruct --lora --data rows.jsonl --out /tmp/run --max-steps 4
    $X logits --model smollm2-135m-instruct --adapter /tmp/run/final --tokens 1,2,3 > /tmp/ours.json
    $X merge-lora --model smollm2-135m-instruct --adapter /tmp/run/final --out /tmp/merged
    .venv/bin/python scripts/check_peft_adapter.py --base /tmp/base --adapter /tmp/run/final \\
        --ours /tmp/ours.json --tokens 1,2,3 --merged /tmp/merged

Prints one JSON object: the largest |logit difference| of PEFT's model (base + our adapter)
against ours, and of transformers' load of the merged directory against PEFT's; exits 1 when
either is above --tol (1e-4).
"""
import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--ours", required=True, help="output of `xtask logits --adapter`")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--merged")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    ids = torch.tensor([[int(t) for t in a.tokens.split(",")]])
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, a.adapter)
    peft.eval()
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits[0]
    with open(a.ours) as f:
        ours = torch.tensor(json.load(f)["logits"])
    out = {
        "positions": ids.shape[1],
        "peft_vs_ours_max_abs": (theirs - ours).abs().max().item(),
        "argmax_equal": bool((theirs.argmax(-1) == ours.argmax(-1)).all()),
        "adapter_changes_logits_by": None,
    }
    with torch.no_grad(), peft.disable_adapter():
        plain = peft(input_ids=ids).logits[0]
    out["adapter_changes_logits_by"] = (theirs - plain).abs().max().item()
    ok = out["peft_vs_ours_max_abs"] <= a.tol
    if a.merged:
        merged = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32)
        with torch.no_grad():
            m = merged(input_ids=ids).logits[0]
        out["merged_vs_peft_max_abs"] = (m - theirs).abs().max().item()
        ok = ok and out["merged_vs_peft_max_abs"] <= a.tol
    out["ok"] = ok
    print(json.dumps(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
