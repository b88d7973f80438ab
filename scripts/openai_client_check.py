#!/usr/bin/env python3
"""Drives `cargo xtask serve` with the official `openai` Python package: the checks a user of
vLLM or OpenAI would make before pointing an application at us. Exits non-zero on the first
failure and prints one line per check.

    python3 -m venv .venv && .venv/bin/pip install openai jsonschema
    cargo xtask serve --model smollm2-135m-instruct --api-key k1 &      # or any model
    .venv/bin/python scripts/openai_client_check.py --base-url http://127.0.0.1:8000/v1 \
        --model smollm2-135m-instruct --api-key k1

Checks: the model list; a chat completion; the same request streamed gives the same text
(fixed seed); `response_format` json_schema output validates with `jsonschema` (strict), also
streamed; reasoning first (`reasoning_effort`) puts the reasoning in `reasoning_content` and
only the JSON in `content`; a schema the server cannot enforce and an unknown model raise the
client's own error types with the server's message.
"""
import argparse
import importlib.metadata
import json
import sys

import jsonschema
import openai

SCHEMA = {
    "type": "object",
    "properties": {
        "lot": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "units": {"type": "integer", "minimum": 0, "maximum": 999},
        "released": {"type": "boolean"},
    },
    "required": ["lot", "units", "released"],
    "additionalProperties": False,
}
MESSAGES = [
    {"role": "system", "content": "Extract the record as JSON."},
    {"role": "user", "content": "Lot AB-123: 40 units counted, released to stock."},
]
FORMAT = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        sys.exit(1)


def streamed(client, **kw):
    reasoning, content, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            d = c.delta
            reasoning += getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content") or ""
            content += d.content or ""
            finish = c.finish_reason or finish
    return reasoning, content, finish


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    print(f"openai {openai.__version__}, jsonschema {importlib.metadata.version('jsonschema')}")

    ids = [m.id for m in client.models.list().data]
    check("models.list", args.model in ids, str(ids))

    kw = dict(model=args.model, messages=MESSAGES, max_tokens=24, temperature=0.8, seed=11)
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content
    check("chat completion", isinstance(text, str) and whole.usage.completion_tokens > 0, repr(text[:60]))
    _, streamed_text, finish = streamed(client, **kw)
    check("stream gives the same text", streamed_text == text and finish == whole.choices[0].finish_reason, repr(streamed_text[:60]))

    kw = dict(model=args.model, messages=MESSAGES, max_tokens=96, temperature=0.7, seed=12, response_format=FORMAT)
    out = client.chat.completions.create(**kw).choices[0].message.content
    value = json.loads(out)
    jsonschema.validate(value, SCHEMA)
    check("response_format json_schema validates", True, out)
    _, s_out, _ = streamed(client, **kw)
    check("streamed json_schema is the same JSON", s_out == out, s_out)

    kw = dict(model=args.model, messages=MESSAGES, max_tokens=160, temperature=0.7, seed=13, response_format=FORMAT, reasoning_effort="low")
    msg = client.chat.completions.create(**kw).choices[0].message
    reasoning = getattr(msg, "reasoning_content", None) or (msg.model_extra or {}).get("reasoning_content")
    jsonschema.validate(json.loads(msg.content), SCHEMA)
    leaked = any(t in (msg.content + (reasoning or "")) for t in ("<think>", "</think>", "<answer>", "</answer>"))
    check("reasoning first: reasoning_content apart, content only the JSON", isinstance(reasoning, str) and not leaked, f"{len(reasoning or '')} chars of reasoning, content {msg.content}")
    s_reasoning, s_content, _ = streamed(client, **kw)
    check("streamed reasoning and content are the same", (s_reasoning, s_content) == (reasoning, msg.content))

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}}
    try:
        client.chat.completions.create(model=args.model, messages=MESSAGES, response_format=bad)
        check("refused schema raises BadRequestError", False, "no error")
    except openai.BadRequestError as e:
        check("refused schema raises BadRequestError", e.status_code == 400 and "$ref" in str(e), str(e)[:160])
    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        check("unknown model raises NotFoundError", False, "no error")
    except openai.NotFoundError as e:
        check("unknown model raises NotFoundError", e.status_code == 404, str(e)[:120])
    print("all checks passed")


if __name__ == "__main__":
    main()
