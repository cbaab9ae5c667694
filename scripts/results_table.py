"""Markdown tables for docs/results.md from finished runs' metrics.json.

    python scripts/results_table.py runs/results          # DATASET/METHOD-seedN: median over seeds
    python scripts/results_table.py --sweep runs/tune     # NAME: one row per learning-rate setting
    python scripts/results_table.py --sizes runs/sizes    # DATASET-SIZE/METHOD-seedN: median over seeds
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ORDER = ("lora", "vera", "vblora", "unilora", "tied_lora", "fastfood")


def seeds_table(root: Path) -> None:
    runs = defaultdict(list)
    for path in sorted(root.glob("*/*/metrics.json")):
        m = json.loads(path.read_text())
        runs[(m["dataset"], m["method"])].append(m)
    print("| dataset | method | stored params | % of LoRA | adapter bytes | accuracy (median of seeds) | vs LoRA (points) | per-seed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for dataset in sorted({d for d, _ in runs}):
        lora = runs.get((dataset, "lora"))
        lora_median = statistics.median(m["test_accuracy"] for m in lora) if lora else None
        for method in ORDER:
            ms = runs.get((dataset, method))
            if not ms:
                continue
            accs = [m["test_accuracy"] for m in ms]
            share = f"{100 * ms[0]['stored_params'] / lora[0]['stored_params']:.1f}%" if lora else "-"
            gap = f"{100 * (statistics.median(accs) - lora_median):+.2f}" if lora else "-"
            seeds = ", ".join(f"{100 * m['test_accuracy']:.2f} (seed {m['settings']['seed']})" for m in ms)
            print(f"| {dataset} | {method} | {ms[0]['stored_params']:,} | {share} | {ms[0]['adapter_bytes']:,} | "
                  f"{100 * statistics.median(accs):.2f} | {gap} | {seeds} |")


def sweep_table(root: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(root.glob("*/metrics.json"))]
    rows.sort(key=lambda m: (ORDER.index(m["method"]), sorted(m["settings"]["group_lrs"].items())))
    print("| method | learning rates | test accuracy | final train loss |")
    print("| --- | --- | ---: | ---: |")
    for m in rows:
        rates = ", ".join(f"{k} {v:g}" for k, v in sorted(m["settings"]["group_lrs"].items()) if k != "head")
        print(f"| {m['method']} | {rates} | {100 * m['test_accuracy']:.2f} | {m['history'][-1]['train_loss']:.3f} |")


def _spread(values: list[float]) -> str:
    return f"{100 * statistics.median(values):.2f} [{100 * min(values):.2f}-{100 * max(values):.2f}]"


def sizes_table(root: Path) -> None:
    """One row per (dataset, size, method): accuracy, its spread over seeds, and what the run was."""
    runs = defaultdict(list)
    for path in sorted(root.glob("*/*/metrics.json")):
        m = json.loads(path.read_text())
        runs[(m["dataset"], m["train_examples"], m["method"])].append(m)
    print("| dataset | train examples | method | % of LoRA | accuracy, median [min-max] | vs LoRA | spread | seeds "
          "| batch x epochs = steps | final train loss | grad norm, median / max |")
    print("| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |")
    for dataset, size in sorted({(d, n) for d, n, _ in runs}):
        lora = runs.get((dataset, size, "lora"))
        lora_median = statistics.median(m["test_accuracy"] for m in lora) if lora else None
        for method in ORDER:
            ms = runs.get((dataset, size, method))
            if not ms:
                continue
            accs = [m["test_accuracy"] for m in ms]
            settings, last = ms[0]["settings"], [m["history"][-1] for m in ms]
            steps = settings["epochs"] * -(-size // settings["batch_size"])
            share = f"{100 * ms[0]['stored_params'] / lora[0]['stored_params']:.1f}%" if lora else "-"
            gap = f"{100 * (statistics.median(accs) - lora_median):+.2f}" if lora else "-"
            loss = statistics.median(h["train_loss"] for h in last)
            norms = (f"{statistics.median(h['grad_norm_median'] for h in last):.3g} / "
                     f"{statistics.median(h['grad_norm_max'] for h in last):.3g}")
            print(f"| {dataset} | {size:,} | {method} | {share} | {_spread(accs)} | {gap} | "
                  f"{100 * (max(accs) - min(accs)):.2f} | {len(ms)} | {settings['batch_size']} x {settings['epochs']} "
                  f"= {steps} | {loss:.3f} | {norms} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--sweep"]:
        sweep_table(Path(args[1] if len(args) > 1 else "runs/tune"))
    elif args[:1] == ["--sizes"]:
        sizes_table(Path(args[1] if len(args) > 1 else "runs/sizes"))
    else:
        seeds_table(Path(args[0] if args else "runs/results"))
