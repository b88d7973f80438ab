#!/usr/bin/env python3
"""TRL's GRPOTrainer on the prompts `cargo xtask bench grpo --model M --prompts-out P.jsonl`
trained on, with the same model, G, lengths and thread count: the reference side of the
GRPO speed and memory comparison (run both in one sitting on one machine).

    cargo xtask import-gguf --in smollm2-135m-instruct --out smol-hf
    cargo xtask bench grpo --model smol-hf --grpo-shape 2,8,64,3 --prompts-out prompts.jsonl
    python scripts/bench_trl_grpo.py --model smol-hf --prompts prompts.jsonl --grpo-shape 2,8,64,3

Same settings as ours: free sampling at temperature 1, beta 0, loss "dapo", one iteration per
generation batch, no gradient accumulation, lr 1e-6, f32 on the CPU (TRL's GRPOConfig turns
bf16 autocast on by default — `bf16=True` even with `use_cpu` — so f32 is set explicitly; --bf16
measures TRL's default instead), TRL's default activation checkpointing (off with
--no-gradient-checkpointing); a cheap length reward
(TRL's reward time is not what is compared). Prints each step's seconds, the median of the
steps after the first, and the peak RSS of the process as JSON.
"""
import argparse
import json
import resource
import statistics
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--prompts", required=True, help="JSONL from `bench grpo --prompts-out`")
    ap.add_argument("--grpo-shape", default="2,8,64,3", help="prompts per step, G, new tokens, steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="turn off TRL's default activation checkpointing (faster, more memory)")
    ap.add_argument("--bf16", action="store_true",
                    help="TRL's default bf16 autocast instead of f32 (slow where the CPU has no bf16 instructions)")
    ap.add_argument("--out", help="also write the figures here")
    args = ap.parse_args()
    per_step, g, length, steps = (int(x) for x in args.grpo_shape.split(","))

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(args.prompts) if line.strip()]
    if len(rows) < per_step * steps:
        raise SystemExit(f"{args.prompts}: {len(rows)} prompts, need {per_step * steps}")
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows[: per_step * steps]])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    def length_reward(completions, **_):
        return [min(len(c), 3 * length) / (3 * length) for c in completions]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            per_device_train_batch_size=per_step * g,
            gradient_accumulation_steps=1,
            num_generations=g,
            max_completion_length=length,
            temperature=1.0,
            beta=0.0,
            loss_type="dapo",
            num_iterations=1,
            learning_rate=1e-6,
            lr_scheduler_type="linear",
            max_steps=steps,
            shuffle_dataset=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            dataloader_num_workers=0,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            bf16=args.bf16,
        )
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=length_reward, args=config, train_dataset=data, callbacks=[timer])
        trainer.train()
    after_first = sorted(timer.times[1:])
    figures = {
        "trl": trl.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "bf16": args.bf16,
        "shape": {"prompts_per_step": per_step, "G": g, "new_tokens": length, "steps": steps},
        "prompt_tokens_mean": statistics.mean(len(r["prompt_ids"]) for r in rows[: per_step * steps]),
        "step_s": timer.times,
        "median_step_after_first_s": after_first[len(after_first) // 2] if after_first else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
