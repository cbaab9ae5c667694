#!/usr/bin/env bash
# The learning-rate sweep behind the methods' rates (each method's recipe, in unilora/methods/;
# docs/results.md, "How the rates were chosen"): seed 0 only, Rotten Tomatoes, 2,000 training
# reviews x 2 epochs, the full test split.
# The final table uses seeds 1-3, so the seed that picked the rates is not among them.
# Two runs at a time with one thread each (6 to 10 minutes per pair on 2 cores); finished runs
# are skipped. Usage: bash scripts/tune_rates.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/tune}
run() {  # NAME METHOD GROUP=RATE...
  local name=$1 method=$2; shift 2
  local rates=()
  for rate in "$@"; do rates+=(--group-lr "$rate"); done
  [ -f "$out/$name/metrics.json" ] || OMP_NUM_THREADS=1 unilora finetune --method "$method" --data rotten_tomatoes \
    --train-limit 2000 --epochs 2 --seed 0 "${rates[@]}" --no-progress --out "$out/$name" > /dev/null
}
pair() { run $1 & local first=$!; run $2 & local second=$!; wait $first; wait $second; }  # each: "NAME METHOD GROUP=RATE..."
pair "lora-1e-3 lora lora=1e-3"                 "lora-3e-3 lora lora=3e-3"
pair "unilora-1e-2 unilora theta=1e-2"          "unilora-2e-2 unilora theta=2e-2"
pair "unilora-4e-2 unilora theta=4e-2"          "vblora-1e-2-1e-2 vblora bank=1e-2 logits=1e-2"
pair "vblora-5e-3-5e-2 vblora bank=5e-3 logits=5e-2" "vblora-2e-2-2e-2 vblora bank=2e-2 logits=2e-2"
pair "vera-3e-2 vera scales=3e-2"               "lora-1e-2 lora lora=1e-2"
pair "vera-1e-2 vera scales=1e-2"               "vblora-4e-2-2e-2 vblora bank=4e-2 logits=2e-2"
python scripts/results_table.py --sweep "$out"
