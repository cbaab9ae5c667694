"""The SVD family (LoRA-XS, TinyLoRA) beside LoRA, Uni-LoRA and VB-LoRA, on the protocol of
docs/results.md: the embedded all-MiniLM-L6-v2 with every linear layer adapted, Rotten Tomatoes (2,000
training reviews, 2 epochs, all 2,646 test reviews) and BBC News (first 64 tokens, 1 epoch, all 444 test
articles), batch 32, seeds 1-3 (seed 0 chose the rates: --tune). PEFT 0.21.2's TinyLoRA trains in the
same loop (`unilora.training.loop.train`) at the same settings, rates, data, head and seeds. The row
"head-only" trains the classifier head alone (no adapter): the floor every method starts from.

    python scripts/svd_results.py                     # every run missing from OUT, then the table
    python scripts/svd_results.py --tune              # seed 0, Rotten Tomatoes, the rate sweep
    python scripts/svd_results.py --table-only --png docs/results-frontier.png

One JSON per run in OUT (docs/results-svd/); runs already there are skipped, so an interrupted sweep
resumes. LoRA, Uni-LoRA and VB-LoRA come from their runs in docs/results-metrics/ (same protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unilora.core.targeting import find_targets  # noqa: E402
from unilora.data.sources import DataSpec  # noqa: E402
from unilora.training.classification import ClassificationTask  # noqa: E402
from unilora.training.loop import TrainSettings, train  # noqa: E402
from unilora.training.recipes import GROUP_LRS, HEAD_LR  # noqa: E402
from unilora.training.runs import run_finetune  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
DATASETS = {  # the protocol of docs/results.md (scripts/run_results.sh)
    "rotten_tomatoes": dict(train_limit=2000, epochs=2, max_length=64),
    "bbc_news": dict(train_limit=None, epochs=1, max_length=64),
}
# name: (library, method, adapter fields)
CONFIGS = {
    "lora_xs-r2": ("ours", "lora_xs", dict(rank=2)),
    "lora_xs-r4": ("ours", "lora_xs", dict(rank=4)),
    "lora_xs-r8": ("ours", "lora_xs", dict(rank=8)),
    "tinylora-u13-wt0": ("ours", "tinylora", dict(rank=2, u=13, weight_tying=0.0)),
    "tinylora-u13-wt1": ("ours", "tinylora", dict(rank=2, u=13, weight_tying=1.0)),
    "tinylora-u64-wt0": ("ours", "tinylora", dict(rank=2, u=64, weight_tying=0.0)),
    "tinylora-u64-wt1": ("ours", "tinylora", dict(rank=2, u=64, weight_tying=1.0)),
    "peft-tinylora-u13-wt0": ("peft", "tinylora", dict(rank=2, u=13, weight_tying=0.0)),
    "peft-tinylora-u13-wt1": ("peft", "tinylora", dict(rank=2, u=13, weight_tying=1.0)),
    "peft-tinylora-u64-wt0": ("peft", "tinylora", dict(rank=2, u=64, weight_tying=0.0)),
    "peft-tinylora-u64-wt1": ("peft", "tinylora", dict(rank=2, u=64, weight_tying=1.0)),
    # the baseline under every row: the head alone (LoRA-XS whose cores train at rate 0 stay zero: ΔW = 0)
    "head-only": ("head", "lora_xs", dict(rank=2)),
}
EARLIER = ("lora", "unilora", "vblora")  # from docs/results-metrics/
TUNE = {"lora_xs-r8": (1e-3, 3e-3, 1e-2, 3e-2), "tinylora-u64-wt0": (1e-3, 3e-3, 1e-2, 3e-2)}


def peft_run(dataset_name: str, fields: dict, seed: int, rate: float) -> dict:
    """PEFT's TinyLoRA trained by our loop on our classifier: same data, head, schedule and rates."""
    from peft import TinyLoraConfig, get_peft_model

    protocol = DATASETS[dataset_name]
    dataset = DataSpec(dataset_name, train_limit=protocol["train_limit"]).load("seq-cls")
    settings = TrainSettings(max_length=protocol["max_length"], epochs=protocol["epochs"], seed=seed, progress=False)
    torch.manual_seed(seed)
    random.seed(seed)
    task = ClassificationTask(dataset)
    classifier = task.build(MODEL, settings)
    targets = find_targets(classifier, "all-linear", exclude=["classifier"])
    config = TinyLoraConfig(r=fields["rank"], u=fields["u"], weight_tying=fields["weight_tying"], target_modules=targets,
                            modules_to_save=["classifier"], projection_seed=seed)
    model = get_peft_model(classifier, config)
    vectors = [p for n, p in model.named_parameters() if p.requires_grad and "tinylora_v" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "tinylora_v" not in n]
    started = time.time()
    history = train(model, task, settings, [{"params": vectors, "lr": rate}, {"params": head, "lr": HEAD_LR}])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = Path(tmp) / "adapter_model.safetensors"  # v, the SVD factors A and B, P (save_projection) and the head
        file_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())
        head_bytes = 4 * sum(p.numel() for p in head)
        adapter_bytes = tensors.stat().st_size - head_bytes  # as ours: without the head (and safetensors' header)
    return {**history[-1], "stored_params": sum(p.numel() for p in vectors), "adapter_bytes": adapter_bytes,
            "file_bytes": file_bytes, "seconds": round(time.time() - started, 1), "history": history}


def ours_run(dataset_name: str, method: str, fields: dict, seed: int, rate: float) -> dict:
    protocol = DATASETS[dataset_name]
    group = next(iter(GROUP_LRS[method]))
    with tempfile.TemporaryDirectory() as tmp:
        run = run_finetune(DataSpec(dataset_name, train_limit=protocol["train_limit"]), method=method, adapter=fields,
                           seed=seed, group_lrs={group: rate}, max_length=protocol["max_length"],
                           epochs=protocol["epochs"], progress=False, out=Path(tmp) / "run")
        adapter = run.out / "adapter"
        file_bytes = sum(p.stat().st_size for p in adapter.iterdir() if p.is_file())
        metrics = run.metrics
    return {**metrics["history"][-1], **{k: metrics[k] for k in ("stored_params", "adapter_bytes", "history")},
            "file_bytes": file_bytes, "seconds": metrics["seconds"]}


def run_one(out: Path, dataset_name: str, name: str, seed: int, rate: float | None = None) -> None:
    library, method, fields = CONFIGS[name]
    rate = rate or table_rate(library, method)
    path = out / f"{dataset_name}-{name}-seed{seed}-lr{rate:g}.json"
    if path.exists():
        return
    print(f"{path.name} ...", flush=True)
    result = (peft_run if library == "peft" else lambda *a: ours_run(a[0], method, *a[1:]))(dataset_name, fields, seed,
                                                                                            rate)
    if library == "head":  # nothing of the adapter is trained or needed
        result.update(stored_params=0, adapter_bytes=0)
    record = {"dataset": dataset_name, "config": name, "library": library, "method": method, **fields, "seed": seed,
              "rate": rate, **result}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def default_rate(method: str) -> float:
    return GROUP_LRS[method][next(iter(GROUP_LRS[method]))]


def table_rate(library: str, method: str) -> float:
    """The rate a configuration's table runs train at: the recipe's (0 for head-only)."""
    return 0.0 if library == "head" else default_rate(method)


def earlier_runs(root: Path) -> list[dict]:
    """LoRA, Uni-LoRA and VB-LoRA on the same protocol (docs/results-metrics/DATASET/METHOD-seedN.json)."""
    rows = []
    for dataset_name in DATASETS:
        for method in EARLIER:
            for seed in (1, 2, 3):
                path = root / dataset_name / f"{method}-seed{seed}.json"
                if path.exists():
                    m = json.loads(path.read_text())
                    rows.append({"dataset": dataset_name, "config": method, "library": "ours", "seed": seed,
                                 "test_accuracy": m["test_accuracy"],
                                 "stored_params": m["stored_params"], "adapter_bytes": m["adapter_bytes"],
                                 "train_seconds": m.get("train_seconds")})
    return rows


def collected(out: Path, earlier: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    return earlier_runs(earlier) + [r for r in runs if r["seed"] in (1, 2, 3)
                                    and r["rate"] == table_rate(r["library"], r["method"])]


def table(rows: list[dict]) -> str:
    lines = ["| dataset | configuration | stored params | tensor bytes | files on disk | accuracy (median of seeds) | "
             "min-max | per seed (1, 2, 3) | train s (median) |", "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for dataset_name in DATASETS:
        for name in (*EARLIER, *CONFIGS):
            runs = sorted((r for r in rows if r["dataset"] == dataset_name and r["config"] == name), key=lambda r: r["seed"])
            if not runs:
                continue
            acc = [100 * r["test_accuracy"] for r in runs]
            stored = runs[0]["stored_params"]
            seconds = [r["train_seconds"] for r in runs if r.get("train_seconds")]
            files = runs[0].get("file_bytes") if runs[0].get("library") != "head" else None  # head-only keeps no adapter
            lines.append(f"| {dataset_name} | {name} | {stored:,} | {runs[0]['adapter_bytes']:,} | "
                         f"{'-' if files is None else f'{files:,}'} | {statistics.median(acc):.2f} | "
                         f"{min(acc):.2f}-{max(acc):.2f} | {', '.join(f'{a:.2f}' for a in acc)} | "
                         f"{f'{statistics.median(seconds):.0f}' if seconds else '-'} |")
    return "\n".join(lines)


def tune_table(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("rotten_tomatoes-*-seed0*.json"))]
    lines = ["| configuration | rate | test accuracy | final train loss |", "| --- | ---: | ---: | ---: |"]
    for r in sorted(runs, key=lambda r: (r["config"], r["rate"])):
        lines.append(f"| {r['config']} | {r['rate']:g} | {100 * r['test_accuracy']:.2f} | {r['train_loss']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], png: Path) -> None:
    """Accuracy (median and range of seeds) against adapter tensor bytes, log x, one panel per dataset.
    PEFT's TinyLoRA: hollow squares in the colour of ours at the same settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [n for n in (*EARLIER, *CONFIGS) if not n.startswith("peft-")]
    colour = {name: plt.cm.tab10(i % 10) for i, name in enumerate(ours)}
    fig, axes = plt.subplots(1, len(DATASETS), figsize=(13, 5))
    for ax, dataset_name in zip(axes, DATASETS):
        for name in (*EARLIER, *CONFIGS):
            runs = [r for r in rows if r["dataset"] == dataset_name and r["config"] == name]
            if not runs:
                continue
            acc = [100 * r["test_accuracy"] for r in runs]
            mid = statistics.median(acc)
            if name == "head-only":  # no bytes to place on a log axis: a line under every method
                ax.axhline(mid, color="black", linestyle="--", label="head only (no adapter)")
                continue
            peft = name.startswith("peft-")
            ax.errorbar([runs[0]["adapter_bytes"]], [mid], yerr=[[mid - min(acc)], [max(acc) - mid]], capsize=3,
                        fmt="s" if peft else ("o" if name in EARLIER else "^"), label=name,
                        color=colour[name.removeprefix("peft-")], mfc="none" if peft else None)
        ax.set(xscale="log", xlabel="adapter tensor bytes, head excluded (log scale)", ylabel="test accuracy (%)",
               title=f"{dataset_name}: MiniLM, all linear layers, seeds 1-3")
        ax.grid(alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", default="docs/results-svd")
    parser.add_argument("--earlier", default="docs/results-metrics")
    parser.add_argument("--tune", action="store_true", help="seed 0, Rotten Tomatoes: the rate sweep (TUNE)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--png", help="also draw accuracy against stored bytes here")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune:
        for name, rates in ((n, r) for n, r in TUNE.items() if n in args.configs.split(",")):
            for rate in rates:
                run_one(out, "rotten_tomatoes", name, 0, rate)
        print(tune_table(out))
        return
    if not args.table_only:
        for dataset_name in args.datasets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for name in args.configs.split(","):
                    run_one(out, dataset_name, name, seed)
    rows = collected(out, Path(args.earlier))
    print(table(rows))
    if args.png:
        plot(rows, Path(args.png))


if __name__ == "__main__":
    sys.exit(main())
