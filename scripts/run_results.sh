#!/usr/bin/env bash
# Reproduces docs/results.md: lora, vera, vblora, unilora x 3 seeds on Rotten Tomatoes and BBC News
# with the embedded all-MiniLM-L6-v2 (all linear layers adapted), then writes the table.
# About an hour on 2 CPU cores. Usage: bash scripts/run_results.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/results}
run() {  # skip runs that already finished, so an interrupted sweep resumes
  local dir=$1; shift
  [ -f "$dir/metrics.json" ] || unilora finetune "$@" --no-progress --out "$dir"
}
for seed in 0 1 2; do
  for method in lora vera vblora unilora; do
    run "$out/rotten_tomatoes/$method-seed$seed" --method "$method" --data rotten_tomatoes \
      --train-limit 2000 --test-limit 1000 --epochs 2 --seed "$seed"
    run "$out/bbc_news/$method-seed$seed" --method "$method" --data bbc_news --max-length 64 --epochs 1 --seed "$seed"
  done
done
python scripts/results_table.py "$out"
