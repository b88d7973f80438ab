#!/usr/bin/env python3
"""Regenerates the GGUF fixtures under fixtures/gguf/ from the Python references.

    python3 -m venv .venv && .venv/bin/pip install gguf numpy torch transformers safetensors tokenizers
    cargo build --release -p xtask            # the script runs `cargo xtask import-gguf`
    .venv/bin/python scripts/make_gguf_fixtures.py

References: the `gguf` package (llama.cpp's own Python reader/writer) for dequantization,
transformers' GGUF loader for logits and chat templates, Python `tokenizers` for token ids.

What it writes (all small, committed):
  quants.gguf + quants_expected.safetensors
      one [4, 256] tensor of every supported type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
      Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K); the expected f32 values are
      gguf.quants.dequantize of the bytes in the file. Types gguf cannot quantize get random
      blocks with finite scales (every bit pattern of the rest is a valid block).
  smollm2.json
      for the committed SmolLM2-135M-Instruct.Q4_1.gguf: prompts (ids), transformers'
      logits (GGUF loader, f32) at 256 fixed vocabulary columns plus each position's argmax
      and max logit; token ids of strings that separate pre-tokenizers; chat renderings from
      transformers' apply_chat_template; and the check that the directory written by
      `cargo xtask import-gguf` reloads in transformers with the same logits and ids.
  qwen2-tiny.gguf + qwen2-tiny.json
      a random tiny Qwen2 written as llama.cpp's qwen2 converter writes it (HF row order, no
      q/k permutation, q/k/v biases), with logits from the original HF model and from
      transformers' GGUF loader (the script asserts they agree: the converter does not
      permute for qwen2).

Which tokenizer reference, and why: llama.cpp (and the model's own HF tokenizer.json) split
every digit before the GPT-2 byte-level regex for `pre = smollm`; transformers' GGUF loader
has no mapping for `smollm` and uses plain byte-level, which differs where whitespace
precedes a digit. The reference ids are Python `tokenizers` with Sequence[Digits(individual),
ByteLevel] over the file's vocab and merges; transformers' GGUF ids are stored beside them,
with whether the two agree.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import quants
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "gguf")
SMOL = os.path.join(ROOT, "assets", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
rng = np.random.default_rng(20261129)

# Offsets of the scale fields that must be finite: (offset, 'f16' | 'f32').
SCALES = {
    Q.Q2_K: [(80, "f16"), (82, "f16")],
    Q.Q3_K: [(108, "f16")],
    Q.Q4_K: [(0, "f16"), (2, "f16")],
    Q.Q5_K: [(0, "f16"), (2, "f16")],
    Q.Q6_K: [(208, "f16")],
}
QUANTIZED = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
ROWS, COLS = 4, 256


def random_blocks(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off, kind in SCALES[qtype]:
        vals = rng.uniform(-0.05, 0.05, size=n_blocks)
        dt = np.float16 if kind == "f16" else np.float32
        raw[:, off:off + np.dtype(dt).itemsize] = vals.astype(dt).view(np.uint8).reshape(n_blocks, -1)
    return raw.reshape(ROWS, -1)


def make_quants():
    path = os.path.join(OUT, "quants.gguf")
    w = gguf.GGUFWriter(path, "quants-fixture")
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    w.add_tensor("F32", x)
    w.add_tensor("F16", x.astype(np.float16))
    w.add_tensor("BF16", quants.quantize(x, Q.BF16), raw_dtype=Q.BF16)
    for qt in QUANTIZED:
        w.add_tensor(qt.name, quants.quantize(x, qt), raw_dtype=qt)
    for qt in SCALES:
        w.add_tensor(qt.name, random_blocks(qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(path)
    expected = {}
    for t in r.tensors:
        values = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(ROWS, COLS)
        assert np.isfinite(values).all(), t.name
        expected[t.name] = np.ascontiguousarray(values)
    save_file(expected, os.path.join(OUT, "quants_expected.safetensors"))
    print(f"quants: {len(expected)} types")


STRINGS = [
    "Batch 2024-117 released at 14:05.",
    '{\n    "ph": 6.8,\n    "lot": [\n        1,\n        22\n    ]\n}',
    "tabs\tand\t\t3 spaces   42 and   7",
    "unicode: café – naïve — 温度 25℃ µg/mL ✓",
    "<|im_start|>user\nHi 5 times<|im_end|>\n",
    "  leading spaces, trailing newline\n\n",
    "x=1+2; y = 3.14159e-10",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Extract the lot number: lot 42."}],
    [{"role": "system", "content": "Return JSON only."}, {"role": "user", "content": "pH 6.8"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "{\"ok\": true}"}, {"role": "user", "content": "Again"}],
]

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The batch record shows a pH of 6.8 and a temperature of 25 degrees.",
    '{"lot": "A-17", "released": true, "count": 3}',
]


def reference_tokenizer(reader):
    from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders

    def field(name):
        f = reader.fields[name]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in reader.fields["tokenizer.ggml.token_type"].data]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def logits_record(model, tok_ids, columns):
    import torch
    with torch.no_grad():
        out = model(torch.tensor([tok_ids])).logits[0].float()
    return {
        "argmax": out.argmax(-1).tolist(),
        "max": out.max(-1).values.tolist(),
        "columns": out[:, columns].tolist(),
    }


def make_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    reader = gguf.GGUFReader(SMOL)
    ref_tok = reference_tokenizer(reader)
    d, f = os.path.dirname(SMOL), os.path.basename(SMOL)
    hf_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    columns = sorted(set(rng.choice(49152, size=240, replace=False).tolist()) | set(range(16)))
    prompts = []
    for text in PROMPTS:
        ids = ref_tok.encode(text).ids
        prompts.append({"text": text, "ids": ids, **logits_record(model, ids, columns)})
    strings = []
    for s in STRINGS:
        ref = ref_tok.encode(s).ids
        tf = hf_tok(s, add_special_tokens=False)["input_ids"]
        strings.append({"text": s, "ids": ref, "transformers_gguf_ids": tf, "transformers_gguf_agrees": ref == tf})
    chats = []
    for conv in CONVERSATIONS:
        for gen in (False, True):
            chats.append({"messages": conv, "add_generation_prompt": gen,
                          "text": hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)})
    record = {"file": "assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
              "reference": "transformers GGUF loader, float32", "columns": columns,
              "prompts": prompts, "strings": strings, "chats": chats}

    # Our import, reloaded by transformers: same logits, same ids, same chat text.
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["cargo", "xtask", "import-gguf", "--in", SMOL, "--out", tmp], cwd=ROOT, check=True)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        tok2 = AutoTokenizer.from_pretrained(tmp)
        worst = 0.0
        for p in prompts:
            with torch.no_grad():
                a = model(torch.tensor([p["ids"]])).logits
                b = reloaded(torch.tensor([p["ids"]])).logits
            worst = max(worst, (a - b).abs().max().item())
        ids_equal = all(tok2(s["text"], add_special_tokens=False)["input_ids"] == s["ids"] for s in strings)
        chat_equal = all(tok2.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"]) == c["text"] for c in chats)
    assert worst < 1e-4, worst
    assert ids_equal and chat_equal, (ids_equal, chat_equal)
    record["import_reload"] = {"max_abs_logit_diff": worst, "token_ids_equal": ids_equal, "chat_equal": chat_equal}
    with open(os.path.join(OUT, "smollm2.json"), "w") as fh:
        json.dump(record, fh)
    print(f"smollm2: import reload max |Δlogit| {worst:.2e}; ids equal {ids_equal}; chat equal {chat_equal}")


def make_qwen2():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(1)
    vocab = 96
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    path = os.path.join(OUT, "qwen2-tiny.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name("qwen2-tiny-fixture")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    toks = [f"t{i}" for i in range(vocab - 3)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    w.add_token_list(toks)
    w.add_token_types([1] * (vocab - 3) + [3, 3, 3])
    w.add_token_merges([])
    w.add_eos_token_id(vocab - 1)
    w.add_bos_token_id(vocab - 3)
    w.add_pad_token_id(vocab - 3)
    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        parts = name.split(".")
        if parts[1] == "layers":
            module, kind = ".".join(parts[3:-1]), parts[-1]
            gname = f"blk.{parts[2]}.{per_layer[module]}.{kind}"
        else:
            gname = f"{names[parts[1]]}.{parts[-1]}"
        arr = p.float().numpy()
        # Linear weights as Q8_0 (a quantized path through a qwen2 model), the rest F32.
        if arr.ndim == 2 and "token_embd" not in gname:
            w.add_tensor(gname, quants.quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded = AutoModelForCausalLM.from_pretrained(OUT, gguf_file="qwen2-tiny.gguf", dtype=torch.float32).eval()
    seqs = [[5, 17, 3, 88, 42, 9, 60], [1, 2, 3, 4]]
    out = []
    for s in seqs:
        with torch.no_grad():
            ref = loaded(torch.tensor([s])).logits[0]
            orig = model(torch.tensor([s])).logits[0]
        # The GGUF holds Q8_0 weights, so the original model differs by quantization only;
        # a wrong row order would change the logits far more.
        assert (ref - orig).abs().max().item() < 0.05, (ref - orig).abs().max().item()
        out.append({"ids": s, "logits": ref.tolist()})
    with open(os.path.join(OUT, "qwen2-tiny.json"), "w") as fh:
        json.dump({"reference": "transformers GGUF loader, float32", "sequences": out}, fh)
    print("qwen2-tiny: written")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    what = sys.argv[1:] or ["quants", "qwen2", "smollm2"]
    if "quants" in what:
        make_quants()
    if "qwen2" in what:
        make_qwen2()
    if "smollm2" in what:
        make_smollm2()
