#!/usr/bin/env bash
# Reproduces docs/results.md: lora, vera, vblora, unilora x seeds 1-3 on Rotten Tomatoes and BBC News
# with the embedded all-MiniLM-L6-v2 (all linear layers adapted, the methods' recipes, unilora/methods/),
# then prints the table. Seed 0 chose the learning rates (scripts/tune_rates.sh), so it is left out.
# Two runs at a time with one thread each; about an hour on 2 cores. Finished runs are skipped,
# so an interrupted sweep resumes. Usage: bash scripts/run_results.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/results}
run() {  # DATASET METHOD SEED
  local dir=$out/$1/$2-seed$3 options=()
  [ "$1" = bbc_news ] && options=(--max-length 64 --epochs 1) || options=(--train-limit 2000 --epochs 2)
  [ -f "$dir/metrics.json" ] || OMP_NUM_THREADS=1 unilora finetune --method "$2" --data "$1" --seed "$3" \
    "${options[@]}" --no-progress --out "$dir" > /dev/null
}
pair() { run $1 & local first=$!; run $2 & local second=$!; wait $first; wait $second; }  # fails if either fails
for dataset in rotten_tomatoes bbc_news; do
  for seed in 1 2 3; do
    pair "$dataset lora $seed" "$dataset vera $seed"
    pair "$dataset vblora $seed" "$dataset unilora $seed"
  done
done
python scripts/results_table.py "$out"
