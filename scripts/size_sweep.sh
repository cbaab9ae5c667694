#!/usr/bin/env bash
# The dataset-size sweep of docs/results.md ("Dataset size"): the default `unilora finetune` command
# (nothing but the data, its size and the seed) for lora, vera, vblora and unilora on Rotten Tomatoes
# with 150, 500, 2,000 and all 10,162 training reviews and BBC News with 150 and all 1,781 articles,
# each tested on its full test split. Seeds 1-3 (seeds 0 and 4 chose the defaults, unilora.training.plan);
# the full Rotten Tomatoes set with the first two seeds, VeRA there with the first only (7 to 15
# minutes per run here). Finished runs are skipped, so an interrupted sweep resumes. Evaluation
# only after the last epoch (--eval-every 1000): evaluation draws no random numbers, so the
# adapters are those of the default command.
# Two workers with one thread each. Usage: bash scripts/size_sweep.sh [OUT_DIR] [SEEDS]
set -euo pipefail
out=${1:-runs/sizes}
mkdir -p "$out"
seeds=${2:-1 2 3}
run() {  # DATASET SIZE METHOD SEED   (SIZE "all": the whole training split)
  local dir=$out/$1-$2/$3-seed$4 limit=()
  [ "$2" = all ] || limit=(--train-limit "$2")
  [ -f "$dir/metrics.json" ] || OMP_NUM_THREADS=1 unilora finetune --method "$3" --data "$1" "${limit[@]}" \
    --seed "$4" --eval-every 1000 --no-progress --out "$dir" > "$out/$1-$2-$3-seed$4.log" 2>&1
}
runs_of() {  # SEED "METHOD..." SIZE...: one line per run
  local seed=$1 methods=$2; shift 2
  for size in "$@"; do
    for method in $methods; do echo "$size $method $seed"; done
  done
}
# The most useful runs first, so that an interrupted sweep leaves a table that says the most:
# seed 1 of everything, then seeds 2-3 of the methods the targets are about, then the rest.
small=("rotten_tomatoes 150" "rotten_tomatoes 500" "rotten_tomatoes 2000" "bbc_news 150" "bbc_news all")
first=${seeds%% *}
{
  runs_of "$first" "vera lora vblora unilora" "${small[@]}"
  for seed in ${seeds#"$first"}; do runs_of "$seed" "lora vblora unilora" "${small[@]}"; done
  runs_of "$first" "vera lora vblora unilora" "rotten_tomatoes all"
  for seed in ${seeds#"$first"}; do runs_of "$seed" "vera" "${small[@]}"; done
  read -r _ second _ <<< "$seeds"
  [ -z "$second" ] || runs_of "$second" "lora vblora unilora" "rotten_tomatoes all"
} > "$out.jobs"
export out
export -f run
xargs -P 2 -L 1 bash -c 'run "$@"' _ < "$out.jobs"  # two workers; a failed run fails the sweep
python scripts/results_table.py --sizes "$out"
