#!/usr/bin/env bash
# Reproduces docs/results.md: lora, vera, vblora, unilora x 3 seeds on Rotten Tomatoes and BBC News
# with the embedded all-MiniLM-L6-v2 (all linear layers adapted), then writes the table.
# About 70 minutes on 2 CPU cores. Usage: bash scripts/run_results.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/results}
for seed in 0 1 2; do
  for method in lora vera vblora unilora; do
    unilora finetune --method "$method" --data rotten_tomatoes --train-limit 3000 --epochs 2 \
      --seed "$seed" --no-progress --out "$out/rotten_tomatoes/$method-seed$seed"
    unilora finetune --method "$method" --data bbc_news --max-length 96 --epochs 1 \
      --seed "$seed" --no-progress --out "$out/bbc_news/$method-seed$seed"
  done
done
python scripts/results_table.py "$out" > docs/results.md.tmp && mv docs/results.md.tmp docs/results.md
