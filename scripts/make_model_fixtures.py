#!/usr/bin/env python3
"""Regenerates the model/tokenizer parity fixtures under fixtures/ from Hugging Face references.

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors tokenizers
    .venv/bin/python scripts/make_model_fixtures.py

What it writes (all small, committed):
  fixtures/qwen2-small/           random Qwen2ForCausalLM (q/k/v bias, untied head, 4 q / 2 kv heads)
  fixtures/qwen2-small-bf16/      the same weights stored as bf16
  fixtures/llama-small/           random LlamaForCausalLM (no bias, tied head)
  each with expected.json: per-sequence logits (each sequence run alone, unpadded) and
  per-token log-probs of given targets (log_softmax gathered in torch).
  fixtures/saved-by-thinkjson/    a model that OUR code initialised and saved
                                  (`cargo xtask init-model`), with transformers_logits.json:
                                  the logits transformers computes after loading that directory.
  fixtures/tokenizer/qwen.json    ids from Python `tokenizers` and chat renderings from
                                  transformers' apply_chat_template for the real Qwen tokenizer.
"""
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
VOCAB = 96
SEQUENCES = [[5, 17, 3, 88, 42, 9, 60], [1, 2, 3], [95, 0, 14, 14, 70]]


def targets_for(seq):
    # Next-token targets; the last position predicts token 7 (any valid id works).
    return seq[1:] + [7]


def perturb(model, seed):
    """HF init leaves norms at 1 and biases at 0; randomise them so those paths are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)


def expected(model, path):
    out = {"sequences": SEQUENCES, "targets": [targets_for(s) for s in SEQUENCES], "logits": [], "logprobs": []}
    with torch.no_grad():
        for seq in SEQUENCES:
            ids = torch.tensor([seq])
            logits = model(input_ids=ids).logits.float()[0]
            lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets_for(seq))[:, None])[:, 0]
            out["logits"].append(logits.tolist())
            out["logprobs"].append(lp.tolist())
    with open(path, "w") as f:
        json.dump(out, f)


def build(kind):
    torch.manual_seed(0 if kind == "qwen2" else 1)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen2":
        cfg = Qwen2Config(rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False, **common)
    else:
        cfg = LlamaConfig(rope_theta=1e4, tie_word_embeddings=True, attention_bias=False, **common)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    perturb(model, 2)
    return model


def models():
    qwen = build("qwen2")
    d = os.path.join(FIX, "qwen2-small")
    qwen.save_pretrained(d, safe_serialization=True)
    expected(qwen, os.path.join(d, "expected.json"))

    d16 = os.path.join(FIX, "qwen2-small-bf16")
    qwen.to(torch.bfloat16).save_pretrained(d16, safe_serialization=True)
    # Reference for bf16 storage: the bf16-rounded weights, computed in f32.
    expected(qwen.float(), os.path.join(d16, "expected.json"))

    llama = build("llama")
    d = os.path.join(FIX, "llama-small")
    llama.save_pretrained(d, safe_serialization=True)
    expected(llama, os.path.join(d, "expected.json"))


def saved_by_thinkjson():
    d = os.path.join(FIX, "saved-by-thinkjson")
    subprocess.run(["cargo", "xtask", "init-model", "--preset", "tiny", "--vocab-size", str(VOCAB),
                    "--layers", "2", "--seed", "11", "--out", d], cwd=ROOT, check=True)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    out = {"transformers_version": __import__("transformers").__version__, "sequences": SEQUENCES, "logits": []}
    with torch.no_grad():
        for seq in SEQUENCES:
            out["logits"].append(model(input_ids=torch.tensor([seq])).logits[0].tolist())
    with open(os.path.join(d, "transformers_logits.json"), "w") as f:
        json.dump(out, f)


TEXTS = [
    "Hello, world!",
    "Batch LOT-2024-0117 released at 14:32 by QA.",
    "Température: 21,5 °C — pH 7.2 ± 0.1; naïve café",
    "中文测试：批次记录 and 日本語のテキスト",
    "emoji 🧪🔬 and symbols ™ © µg/mL",
    "spaces    between\twords\n\n\nand   trailing   ",
    "   leading spaces and\r\nwindows newlines",
    '{"lot": "A-17", "temp_c": 21.5, "passed": true, "tags": ["x", "y"]}',
    "<|im_start|>user\nExtract the record.<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nThe lot number is A-17.\n</think>\n\n<answer>{\"lot\": \"A-17\"}</answer>",
    "<|endoftext|>12345678901234567890 3.14159e-10",
    "",
]

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You extract JSON."},
                  {"role": "user", "content": "Record: lot A-17, 21.5 °C."}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Follow the schema."},
                  {"role": "user", "content": "First text"},
                  {"role": "assistant", "content": "<think>\nreasoning one\n</think>\n\n<answer>{}</answer>"},
                  {"role": "user", "content": "Second text"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Fill it."},
                  {"role": "assistant", "content": "<think>\nfield by field\n</think>\n\n<answer>{\"a\": 1}</answer>"}],
     "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "No thinking please"}],
     "add_generation_prompt": True, "enable_thinking": False},
]


def no_think_tokenizer(path):
    """A small byte-level BPE where <think> is NOT an added token (plain text)."""
    from tokenizers import models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    tok.save(path)


def tokenizer_fixture():
    qwen_dir = os.path.join(ROOT, "assets", "qwen")
    tok = Tokenizer.from_file(os.path.join(qwen_dir, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(qwen_dir)
    out = {"encodings": [], "chats": []}
    for t in TEXTS:
        out["encodings"].append({"text": t, "ids": tok.encode(t, add_special_tokens=False).ids})
    for c in CONVERSATIONS:
        kwargs = {"enable_thinking": c["enable_thinking"]} if "enable_thinking" in c else {}
        text = hf.apply_chat_template(c["messages"], tokenize=False,
                                      add_generation_prompt=c["add_generation_prompt"], **kwargs)
        out["chats"].append({**c, "rendered": text})
    os.makedirs(os.path.join(FIX, "tokenizer"), exist_ok=True)
    no_think_tokenizer(os.path.join(FIX, "tokenizer", "no-think-tokenizer.json"))
    with open(os.path.join(FIX, "tokenizer", "qwen.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    steps = sys.argv[1:] or ["models", "tokenizer", "saved"]
    if "models" in steps:
        models()
    if "tokenizer" in steps:
        tokenizer_fixture()
    if "saved" in steps:
        saved_by_thinkjson()
