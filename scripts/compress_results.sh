#!/usr/bin/env bash
# Distillation results of docs/results.md ("Compressing a LoRA classifier"): the LoRA adapters of the
# dataset-size sweep (scripts/size_sweep.sh: Rotten Tomatoes 2,000 reviews and all of BBC News,
# seeds 1-3) are the teachers; each is compressed into Uni-LoRA (d = 9,000) and VB-LoRA (the
# recipe's bank) with `unilora compress --adapter`, on the teacher's own training texts (labels
# unused), the default schedule and, as for the teachers, one evaluation at the end (--eval-every
# 1000). Then the causal LM (OUT_DIR-lm): BBC News headlines on SmolLM2-135M-Instruct, 96
# training / 64 test articles; per seed a LoRA teacher trained by the default `unilora finetune`
# command, then distilled into both students on its 96 training texts.
# Two workers with one thread each; finished runs are skipped.
# Usage: bash scripts/compress_results.sh [SIZES_DIR] [OUT_DIR] [SEEDS]
set -euo pipefail
sizes=${1:-runs/sizes}
out=${2:-runs/compress}
seeds=${3:-1 2 3}
mkdir -p "$out"
lm=$out-lm
mkdir -p "$lm"
run() {  # DATASET SIZE METHOD SEED
  local teacher=$sizes/$1-$2/lora-seed$4/adapter dir=$out/$1-$2/$3-seed$4 limit=()
  [ "$2" = all ] || limit=(--train-limit "$2")
  [ -f "$dir/adapter_config.json" ] || OMP_NUM_THREADS=1 unilora compress "$dir" --adapter "$teacher" --method "$3" \
    --data "$1" "${limit[@]}" --seed "$4" --eval-every 1000 --no-progress > "$out/$1-$2-$3-seed$4.log" 2>&1
}
run_lm() {  # SEED: the teacher, then its two students
  local teacher=$lm/teachers/lora-seed$1 limit=(--train-limit 96 --test-limit 64)
  [ -f "$teacher/metrics.json" ] || OMP_NUM_THREADS=1 unilora finetune --task causal-lm --method lora \
    --data bbc_headlines "${limit[@]}" --seed "$1" --no-progress --out "$teacher" > "$lm/teacher-seed$1.log" 2>&1
  for method in unilora vblora; do
    [ -f "$lm/bbc_headlines/$method-seed$1/adapter_config.json" ] || OMP_NUM_THREADS=1 unilora compress \
      "$lm/bbc_headlines/$method-seed$1" --adapter "$teacher/adapter" --method "$method" "${limit[@]}" --seed "$1" \
      --no-progress > "$lm/bbc_headlines-$method-seed$1.log" 2>&1
  done
}
for seed in $seeds; do
  for task in "rotten_tomatoes 2000" "bbc_news all"; do
    for method in unilora vblora; do echo "run $task $method $seed"; done
  done
  echo "run_lm $seed"
done > "$out.jobs"
export sizes out lm
export -f run run_lm
xargs -P 2 -L 1 bash -c '"$@"' _ < "$out.jobs"
python scripts/results_table.py --compress "$out" "$sizes"
python scripts/results_table.py --compress-lm "$lm"
