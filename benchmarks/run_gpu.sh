#!/usr/bin/env bash
# The GPU benchmarks: a 1B+ Llama with random weights (benchmarks/random_llama.py), saliency against the
# reference loop, captum and the min(N, M)-forward floor, and the capture overhead, on CUDA. Writes
# benchmarks/results/gpu_*.md like run_all.sh. Needs a CUDA GPU (about 20 GB for the 1b model in float32).
#
#   benchmarks/run_gpu.sh               # SIZE=1b by default; SIZE=7b for a LLaMA-7B shape (needs ~60 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SIZE=${SIZE:-1b}
MODEL=${MODEL_DIR:-/tmp/random-llama-$SIZE}
OUT=benchmarks/results
mkdir -p "$OUT"
python benchmarks/random_llama.py --size "$SIZE" --out "$MODEL"
header() { printf '# %s\n\n`%s`\n\n%s\n\n' "$1" "$2" "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"; }
cmd="python benchmarks/bench_saliency.py --model $MODEL --response 64 --prompts 2 --repeats 3 --baseline-tokens 16 --methods reference captum --device cuda"
{ header "saliency, random Llama $SIZE, GPU" "$cmd"; $cmd; } | tee "$OUT/gpu_saliency_$SIZE.md"
cmd="python benchmarks/bench_capture.py --model $MODEL --seq 128 --batches 1 8 --repeats 20 --device cuda"
{ header "capture overhead, random Llama $SIZE, GPU" "$cmd"; $cmd; } | tee "$OUT/gpu_capture_$SIZE.md"
