"""Markdown tables for docs/results.md from finished runs' metrics.json.

    python scripts/results_table.py runs/results          # DATASET/METHOD-seedN: median over seeds
    python scripts/results_table.py --sweep runs/tune     # NAME: one row per learning-rate setting
    python scripts/results_table.py --sizes runs/sizes    # DATASET-SIZE/METHOD-seedN: median over seeds
    python scripts/results_table.py --compress runs/compress runs/sizes   # distilled students and their teachers
    python scripts/results_table.py --compress-lm runs/compress-lm        # the same for causal-LM teachers
    python scripts/results_table.py --variants runs/val/compress          # DATASET/VARIANT-METHOD-seedN (or the
                                                                          # records kept in docs/results-compress/validation)
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


def compress_table(root: Path, sizes: Path) -> None:
    """One row per (dataset, method): teacher, base and student accuracy, the share of the teacher's
    gain the student keeps, agreement, and the compute against the teacher's training."""
    runs = defaultdict(list)
    for path in sorted(root.glob("*/*/adapter_config.json")):
        meta = json.loads(path.read_text())
        task, seed = meta["task"], path.parent.name.rsplit("seed", 1)[1]
        teacher = json.loads((sizes / path.parent.parent.name / f"lora-seed{seed}" / "metrics.json").read_text())
        runs[(task["dataset"] if "dataset" in task else path.parent.parent.name, meta["adapter"]["method"])].append(
            (task["distillation"], teacher, meta))
    print("| data | student | % of the teacher's params | teacher accuracy | base (teacher's head) | weight-space fit "
          "| distilled student | gain kept, median [min-max] | each seed's gain kept [95 % interval] "
          "| gain kept in eval loss, median [min-max] | each seed's, in eval loss [95 % interval] | agreement "
          "| student seconds: training / all | teacher seconds: training / all | seeds |")
    print("| --- | --- | ---: | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---: |")
    for (data, method), rows in sorted(runs.items()):
        def median(get):
            return statistics.median(get(d, t) for d, t, _ in rows)

        share = statistics.median(100 * m["stored_params"] / t["stored_params"] for _, t, m in rows) \
            if all("stored_params" in m for _, _, m in rows) else None
        print(f"| {data} | {method} | {'-' if share is None else f'{share:.1f}%'} "
              f"| {100 * median(lambda d, t: d['distilled']['teacher_accuracy']):.2f} "
              f"| {100 * median(lambda d, t: d['base_model']['student_accuracy']):.2f} "
              f"| {100 * median(lambda d, t: d['weight_space_fit']['student_accuracy']):.2f} "
              f"| {100 * median(lambda d, t: d['distilled']['student_accuracy']):.2f} "
              f"| {kept_spread(rows)} | {each_kept(rows)} | {kept_spread(rows, 'eval_loss')} | {each_kept(rows, 'eval_loss')} "
              f"| {100 * median(lambda d, t: d['distilled']['agreement']):.2f} "
              f"| {seconds(rows, lambda d, t, m: d['distilled'])} / {median(lambda d, t: d['seconds']):.0f} "
              f"| {seconds(rows, lambda d, t, m: t)} / {median(lambda d, t: t['seconds']):.0f} | {len(rows)} |")


def compress_lm_table(root: Path) -> None:
    """One row per (data, student): eval loss of teacher, base, fit and student, the share of the
    teacher's eval-loss gain the student keeps, next-token agreement, the metric on generations, and
    the compute against the teacher's training."""
    runs = defaultdict(list)
    for path in sorted(root.glob("*/*/adapter_config.json")):
        if path.parent.parent.name == "teachers":
            continue
        meta = json.loads(path.read_text())
        seed = path.parent.name.rsplit("seed", 1)[1]
        teacher = json.loads((root / "teachers" / f"lora-seed{seed}" / "metrics.json").read_text())
        runs[(path.parent.parent.name, meta["adapter"]["method"])].append((meta["task"]["distillation"], teacher, meta))
    print("| data | student | % of the teacher's params | eval loss: teacher | base | weight-space fit | distilled "
          "| gain kept, median [min-max] | each seed's gain kept [95 % interval] | next-token agreement | ROUGE-L, teacher / student "
          "| student seconds: training / all | teacher seconds: training / all | seeds |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- | --- | ---: |")
    for (data, method), rows in sorted(runs.items()):
        def median(get):
            return statistics.median(get(d, t, m) for d, t, m in rows)

        print(f"| {data} | {method} | {median(lambda d, t, m: 100 * m['stored_params'] / t['stored_params']):.2f}% "
              f"| {median(lambda d, t, m: d['distilled']['teacher_eval_loss']):.3f} "
              f"| {median(lambda d, t, m: d['base_model']['eval_loss']):.3f} "
              f"| {median(lambda d, t, m: d['weight_space_fit']['eval_loss']):.3f} "
              f"| {median(lambda d, t, m: d['distilled']['eval_loss']):.3f} "
              f"| {kept_spread(rows)} | {each_kept(rows)} | {100 * median(lambda d, t, m: d['distilled']['agreement']):.2f} "
              f"| {median(lambda d, t, m: d['distilled'].get('teacher_rougeL', float('nan'))):.1f} / "
              f"{median(lambda d, t, m: d['distilled'].get('rougeL', float('nan'))):.1f} "
              f"| {seconds(rows, lambda d, t, m: d['distilled'])} / {median(lambda d, t, m: d['seconds']):.0f} "
              f"| {seconds(rows, lambda d, t, m: t)} / {median(lambda d, t, m: t['seconds']):.0f} | {len(rows)} |")


def measured_gain(record: dict, measure: str | None) -> tuple[float | None, list | None]:
    """A run's share of the gain and its interval: the headline's (measure None), or one measure's
    (a classifier's "eval_loss"); None for runs recorded before that measure was."""
    if measure is None:
        return record["kept_gain"], record.get("kept_gain_interval")
    gain = record.get("kept_gain_by_measure", {}).get(measure, {})
    return gain.get("kept"), gain.get("interval")


def kept_spread(rows, measure: str | None = None) -> str:
    """The runs' shares of the gain, median [min-max]; runs whose teacher gained nothing (None) are left out."""
    kept = [k for k, _ in (measured_gain(d, measure) for d, _, _ in rows) if k is not None]
    return f"{100 * statistics.median(kept):.1f} % [{100 * min(kept):.1f}-{100 * max(kept):.1f}]" if kept else "-"


def each_kept(rows, measure: str | None = None) -> str:
    """Each run's share of the teacher's gain with its interval over the held-out texts (gain.py):
    how much of the spread between seeds is the test set's noise. "-" for a run without one."""
    def one(record: dict) -> str:
        kept, interval = measured_gain(record, measure)
        if kept is None:
            return "-"
        return f"{100 * kept:.1f}" + (f" [{100 * interval[0]:.0f}-{100 * interval[1]:.0f}]" if interval else "")
    return "; ".join(one(d) for d, _, _ in rows)  # in the order of the runs' folders: by seed


def variant_records(root: Path):
    """(dataset, variant, method, distillation record) of each run of scripts/compress_validation.sh:
    its folders (DATASET/VARIANT-METHOD-seedN/adapter_config.json) or the records kept in docs/
    (DATASET_VARIANT-METHOD-seedN.json)."""
    for path in sorted(root.glob("*/*/adapter_config.json")):
        variant, method, _ = path.parent.name.rsplit("-", 2)
        yield path.parent.parent.name, variant, method, json.loads(path.read_text())["task"]["distillation"]
    for path in sorted(root.glob("*_*-*-seed*.json")):
        data_variant, method, _ = path.stem.rsplit("-", 2)
        data, variant = data_variant.rsplit("_", 1)
        yield data, variant, method, json.loads(path.read_text())["distillation"]


def variants_table(root: Path) -> None:
    """One row per (dataset, student, variant) of scripts/compress_validation.sh: the share of the
    gain kept, held-out KL to the teacher and agreement, median [min-max] over the seeds."""
    runs = defaultdict(list)
    for data, variant, method, record in variant_records(root):
        runs[(data, method, variant)].append(record)
    print("| data | student | variant | gain kept, median [min-max] | held-out KL to the teacher | agreement "
          "| training seconds | seeds |")
    print("| --- | --- | --- | --- | --- | --- | ---: | ---: |")

    def spread(values, scale, digits) -> str:
        values = [scale * v for v in values]
        return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"

    for (data, method, variant), rows in sorted(runs.items()):
        kept = [d["kept_gain"] for d in rows if d["kept_gain"] is not None]
        print(f"| {data} | {method} | {variant} | {spread(kept, 100, 1) if kept else '-'} "
              f"| {spread([d['distilled']['kl_to_teacher'] for d in rows], 1, 4)} "
              f"| {spread([d['distilled']['agreement'] for d in rows], 100, 2)} "
              f"| {statistics.median(d['distilled']['train_seconds'] for d in rows):.0f} | {len(rows)} |")


def seconds(rows, record) -> str:
    """Median training seconds (`train_seconds`) of the records that have them; "-" where none does
    (runs from before it was recorded)."""
    found = [record(*row)["train_seconds"] for row in rows if "train_seconds" in record(*row)]
    return f"{statistics.median(found):.0f}" if found else "-"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--sweep"]:
        sweep_table(Path(args[1] if len(args) > 1 else "runs/tune"))
    elif args[:1] == ["--compress"]:
        compress_table(Path(args[1] if len(args) > 1 else "runs/compress"), Path(args[2] if len(args) > 2 else "runs/sizes"))
    elif args[:1] == ["--compress-lm"]:
        compress_lm_table(Path(args[1] if len(args) > 1 else "runs/compress-lm"))
    elif args[:1] == ["--variants"]:
        variants_table(Path(args[1] if len(args) > 1 else "runs/val/compress"))
    elif args[:1] == ["--sizes"]:
        sizes_table(Path(args[1] if len(args) > 1 else "runs/sizes"))
    else:
        seeds_table(Path(args[0] if args else "runs/results"))
