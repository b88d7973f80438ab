#!/usr/bin/env bash
# One device call's worth of CUDA checks, run from the repository root on a GPU machine with
# a binary built here (see README, "GPU"):
#
#   cargo build --release -p xtask --features cuda
#   mkdir -p .gpu && strip -o .gpu/xtask target/release/xtask && gzip -f .gpu/xtask
#   # on the GPU machine (the image has torch + transformers; nothing is downloaded):
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Steps, each under its own time limit so one that hangs leaves the others' results:
#   1. `bench gpu`: parity with the transformers fixtures and the CPU, then the qwen2.5-1.5b
#      shape in f32 and bf16 (prefill, decode, constrained decode, SFT step, GRPO step);
#   2. `scripts/bench_torch_gpu.py`: torch + transformers on the same shapes, same sitting;
#   3. a small pipeline of the tiny preset end to end on CUDA (every stage; stage times in
#      its log).
# Everything lands in $OUT (bench JSON, logs).
set -u
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
bin=.gpu/xtask
[ -f .gpu/xtask.gz ] && { gzip -dc .gpu/xtask.gz > /tmp/xtask && chmod +x /tmp/xtask && bin=/tmp/xtask; }
# cubecl compiles its kernels with NVRTC, which cudarc loads at run time.
nvrtc=$(timeout 30 find /usr/local /opt /usr/lib -name 'libnvrtc.so*' 2>/dev/null | head -1)
[ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    echo "nvrtc: ${nvrtc:-not found}"; ldd "$bin" | grep -i "not found"
} 2>&1 | tee "$OUT/env.log"

t0=$(date +%s)
timeout "${BENCH_S:-240}" "$bin" bench gpu --device cuda:0 ${QUICK:+--quick} --out "$OUT/ours.json" > "$OUT/ours.log" 2>&1
echo "bench gpu: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.log"
tail -n 60 "$OUT/ours.log"

t0=$(date +%s)
PYTHONUNBUFFERED=1 timeout "${TORCH_S:-150}" python3 scripts/bench_torch_gpu.py ${QUICK:+--quick} --out "$OUT/torch.json" > "$OUT/torch.log" 2>&1
echo "torch: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.log"
tail -n 40 "$OUT/torch.log"

# The tiny preset's plumbing, cut to fit a lease: 16 SFT steps, 2 GRPO steps, 8 eval rows.
cat > /tmp/pipeline-gpu.toml <<'EOT'
out = "/tmp/pipeline-gpu"
finetune = "full"
[model]
preset = "tiny"
[tokenizer]
vocab_size = 8192
template_from = "assets/qwen/tokenizer_config.json"
[synth]
sft_rows = 64
grpo_rows = 16
eval_rows = 8
[sft]
epochs = 1
lr = 2e-3
[grpo]
num_generations = 4
max_steps = 2
max_completion_len = 64
lr = 1e-3
[eval]
rows = 8
max_new_tokens = 64
max_think_tokens = 16
loss_rows = 4
EOT
t0=$(date +%s)
timeout "${PIPELINE_S:-150}" "$bin" pipeline --config /tmp/pipeline-gpu.toml --device "${PIPELINE_DEVICE:-cuda:0}" > "$OUT/pipeline.log" 2>&1
echo "small tiny-preset pipeline on ${PIPELINE_DEVICE:-cuda:0}: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.log"
tail -n 25 "$OUT/pipeline.log" | cut -c1-400
[ -f /tmp/pipeline-gpu/eval/report/report.md ] && cp /tmp/pipeline-gpu/eval/report/report.md "$OUT/pipeline-report.md"
exit 0
