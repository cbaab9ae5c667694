"""Aggregate runs/results/DATASET/METHOD-seedN/metrics.json into the markdown of docs/results.md."""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results")
runs = defaultdict(list)
for path in sorted(root.glob("*/*/metrics.json")):
    m = json.loads(path.read_text())
    runs[(m["dataset"], m["method"])].append(m)

print("| dataset | method | stored params | % of LoRA | adapter bytes | accuracy (median of seeds) | seeds | per-seed |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
for dataset in sorted({d for d, _ in runs}):
    lora = runs.get((dataset, "lora"))
    for method in ("lora", "vera", "vblora", "unilora", "tied_lora", "fastfood"):
        ms = runs.get((dataset, method))
        if not ms:
            continue
        accs = [m["test_accuracy"] for m in ms]
        share = f"{100 * ms[0]['stored_params'] / lora[0]['stored_params']:.1f}%" if lora else "-"
        print(f"| {dataset} | {method} | {ms[0]['stored_params']:,} | {share} | {ms[0]['adapter_bytes']:,} | "
              f"{100 * statistics.median(accs):.2f} | {len(accs)} | {', '.join(f'{100 * a:.2f}' for a in accs)} |")
