"""The `unilora` command: finetune, evaluate, generate, inspect, export, convert, compress, count, demo."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from ..core.config import VBLORA_SELECTIONS, AdapterConfig
from ..core.registry import method_names
from ..core.errors import UniLoraError
from ..core.tasks import METRICS
from ..training.recipes import DEFAULT_HIDDEN_LAYERS, HIDDEN_LAYERS

TASKS = ("seq-cls", "causal-lm")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _ratio(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _group_lr(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not (name and sep):
            raise ValueError
        return name, _positive_float(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"--group-lr expects NAME=RATE (e.g. bank=1e-3), got '{text}'") from None


def _add_adapter_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("adapter (defaults per method: see unilora.recipes)")
    g.add_argument("--method", choices=method_names(), default="unilora")
    g.add_argument("--rank", type=_positive_int)
    g.add_argument("--theta-dim", type=_positive_int, help="Uni-LoRA / Fastfood: length d of the trained vector")
    g.add_argument("--num-vectors", type=_positive_int, help="VB-LoRA: bank size h")
    g.add_argument("--vector-length", type=_positive_int, help="VB-LoRA: sub-vector length b")
    g.add_argument("--topk", type=_positive_int, help="VB-LoRA: k")
    g.add_argument("--selection", choices=VBLORA_SELECTIONS, help="VB-LoRA: vector selection during training")
    g.add_argument("--store", choices=("topk", "logits"), help="VB-LoRA: what the adapter file keeps")
    g.add_argument("--init", choices=("uniform", "zero_delta"), help="Uni-LoRA: initialisation of θ_d")
    g.add_argument("--adapter-seed", type=int, help="seed of the projection (default: --seed)")


def _adapter_config(args, targets, modules_to_save=(), defaults=None, auto_vector_length=False) -> AdapterConfig:
    """The adapter config from the method's defaults and the options given. With
    `auto_vector_length`, VB-LoRA's b is chosen from the model (the recipe's b fits MiniLM only)."""
    from ..training.recipes import METHOD_DEFAULTS

    options = dict((defaults or METHOD_DEFAULTS)[args.method])
    if auto_vector_length:
        options.pop("vector_length", None)
    for key in ("rank", "theta_dim", "num_vectors", "vector_length", "topk", "selection", "store", "init"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    seed = args.adapter_seed if getattr(args, "adapter_seed", None) is not None else getattr(args, "seed", 0)
    return AdapterConfig(method=args.method, target_modules=targets, modules_to_save=list(modules_to_save), seed=seed, **options)


DATA_HELP = ("classification: rotten_tomatoes (default), bbc_news, or a CSV/JSONL file with text and label columns; "
             "causal LM: bbc_headlines, rotten_tomatoes_instruct, a .txt file, or JSONL with text, "
             "prompt/completion or chat messages")


def _add_data_options(parser: argparse.ArgumentParser, data_help: str = DATA_HELP) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", help=data_help)
    g.add_argument("--test-data", help="separate test file (default: a seeded 20%% split)")
    g.add_argument("--text-column", default="text")
    g.add_argument("--label-column", default="label")
    g.add_argument("--train-limit", type=_positive_int, help="train on a seeded random subset of this size")
    g.add_argument("--test-limit", type=_positive_int, help="evaluate on a seeded random subset of this size")


def _load_data(args, task: str):
    if task == "causal-lm":
        from ..data.lm import load_lm_dataset

        dataset = load_lm_dataset(args.data, args.text_column, args.test_data, seed=0,
                                  metric=getattr(args, "metric", None))
    else:
        from ..data.text import load_dataset

        if getattr(args, "metric", None):
            raise UniLoraError("--metric scores generated answers and goes with --task causal-lm")
        dataset = load_dataset(args.data, args.text_column, args.label_column, args.test_data, seed=0)
    return dataset.limited(args.train_limit, args.test_limit, seed=0)


# per task: (default model, max length)
TASK_DEFAULTS = {"seq-cls": ("all-MiniLM-L6-v2", 64), "causal-lm": ("SmolLM2-135M-Instruct", 256)}


def _resolve_task(args) -> str:
    """--task, else what the data and the model say (lm_data.is_lm_data); an LLM with labelled
    data is ambiguous."""
    from ..models.backbones import is_causal_lm
    from ..data.lm import is_lm_data

    causal_model = args.model is not None and is_causal_lm(args.model)
    task = args.task
    if task is None:
        if args.data is not None and is_lm_data(args.data, args.text_column):
            task = "causal-lm"
        elif causal_model:
            raise UniLoraError(
                f"'{args.model}' is a causal language model and "
                + ("the data has labels" if args.data else "no --data was given")
                + ": pass --task seq-cls to train a classifier on it, or --task causal-lm with text, "
                "prompt/completion or chat data")
        else:
            task = "seq-cls"
    if task == "causal-lm" and args.model is not None and not causal_model:
        raise UniLoraError(f"'{args.model}' is not a causal language model (its config names no *ForCausalLM "
                           "architecture); --task causal-lm needs one")
    if args.data is None:
        if task == "causal-lm":
            raise UniLoraError("--task causal-lm needs --data (bbc_headlines, rotten_tomatoes_instruct, a .txt "
                               "file, or JSONL with text, prompt/completion or chat messages)")
        args.data = "rotten_tomatoes"
    default_model, max_length = TASK_DEFAULTS[task]
    args.model = args.model or default_model
    args.max_length = args.max_length or max_length
    return task


def _add_lm_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("causal LM")
    g.add_argument("--metric", choices=METRICS, help="score generated test answers: rougeL, accuracy (first word), "
                   "exact_match (default: the built-in task's metric; none for files)")
    g.add_argument("--max-new-tokens", type=_positive_int, help="tokens generated per test answer (default: the "
                   "longest reference answer + 4)")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _targets(text: str):
    if text == "all-linear" or any(c in text for c in "*()[]|\\^$"):
        return text
    return [t for t in text.split(",") if t]


def cmd_finetune(args) -> int:
    from ..models.backbones import is_embedded
    from ..data.text import small_classes
    from ..training.recipes import GROUP_LRS, HEAD_LR
    from ..training.loop import TrainSettings
    from ..training.runs import RUN_FILES, finetune
    from ..store.writing import check_writable

    out = Path(args.out or f"runs/{args.method}-{Path(args.data or 'rotten_tomatoes').stem}-seed{args.seed}")
    check_writable(out, RUN_FILES, args.overwrite, "run")  # before any data is read or model loaded
    task = _resolve_task(args)
    classify = task == "seq-cls"
    if args.head_lr is not None and not classify:
        raise UniLoraError("--head-lr sets the classifier head's rate; a causal LM has no head to train")
    config = _adapter_config(args, _targets(args.targets), modules_to_save=["classifier"] if classify else [],
                             auto_vector_length=not is_embedded(args.model))
    group_lrs = {**GROUP_LRS[args.method], **({"head": args.head_lr or HEAD_LR} if classify else {})}
    if args.lr is not None:
        group_lrs = {k: (v if k == "head" else args.lr) for k, v in group_lrs.items()}
    given = dict(args.group_lr or [])
    group_lrs.update(given)
    fit_rates = args.lr is None and "theta" not in given  # the recipe's θ rate, scaled to the model
    dataset = _load_data(args, task)  # fails early, before any training, on bad data options
    small = small_classes(dataset) if classify else []
    if small:
        _warn(f"few training examples for {', '.join(small[:5])}: under 10 per class, expect a weak or "
              "majority-class model")
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                             warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                             lr=args.lr or 1e-3, group_lrs=group_lrs, seed=args.seed, progress=not args.no_progress,
                             packing=args.packing, max_new_tokens=args.max_new_tokens, fit_rates=fit_rates,
                             group_by_length=args.group_by_length)
    metrics = finetune(args.model, dataset, config, settings, out, overwrite=args.overwrite)
    if metrics:
        print(f"adapter: {out / 'adapter'}  ({metrics['stored_params']:,} stored params, "
              f"{metrics['adapter_bytes']:,} bytes" + (f" + head {metrics['head_params']:,} params)" if classify else ")"))
        if classify:
            print(f"test accuracy: {metrics['test_accuracy']:.4f}")
        else:
            metric = dataset.metric
            print(f"eval loss: {metrics['eval_loss']:.4f} (perplexity {metrics['perplexity']:.2f})"
                  + (f", {metric}: {metrics[metric]:.4f}" if metric else ""))
    return 0


def cmd_evaluate(args) -> int:
    from ..training.runs import evaluate_adapter
    from ..training.records import read_task_adapter
    from ..core.tasks import task_kind

    adapter, task = read_task_adapter(args.adapter)
    if args.data is None and args.test_data:
        raise UniLoraError("--test-data goes with --data (the training file of the test data)")
    dataset = _load_data(args, task_kind(task)) if args.data is not None else None
    if dataset is None and args.metric:
        raise UniLoraError("--metric goes with --data; without --data the recorded data's metric is used")
    result = evaluate_adapter(adapter, dataset, args.model, limits=(args.train_limit, args.test_limit),
                              max_new_tokens=args.max_new_tokens)
    for note in result.pop("notes"):
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


def cmd_generate(args) -> int:
    from ..training.causal_lm import generate_from_adapter, prompts_from_file

    if bool(args.prompt) == bool(args.prompts):
        raise UniLoraError("give either --prompt TEXT or --prompts FILE.jsonl")
    prompts = [args.prompt] if args.prompt else prompts_from_file(args.prompts)
    outputs = generate_from_adapter(args.adapter, prompts, args.max_new_tokens, merge=args.merge, model_name=args.model)
    if args.prompt:
        print(outputs[0])
    else:
        for prompt, output in zip(prompts, outputs):
            print(json.dumps({"prompt": prompt, "generation": output}, ensure_ascii=False))
    return 0


def cmd_inspect(args) -> int:
    from ..tools.inspection import describe, save_selection_plot

    info = describe(args.adapter)
    png = None
    if info["method"] == "vblora" and not args.no_plot:
        png = Path(args.png) if args.png else Path(str(Path(args.adapter).resolve()) + "-selection.png")
        folder = next(p for p in [png.parent, *png.parent.parents] if p.exists())
        if not os.access(folder, os.W_OK):
            raise UniLoraError(f"cannot write the selection plot to '{png}' ('{folder}' is not writable); "
                               "pass --png PATH or --no-plot")
    for key, value in info.items():
        print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
    if png is not None:
        save_selection_plot(args.adapter, png)
        print(f"vector-usage histogram and selection footprint: {png}")
    return 0


def cmd_export(args) -> int:
    from ..tools.export import export_peft_lora

    report = export_peft_lora(args.adapter, args.out, rank=args.rank, overwrite=args.overwrite)
    for line in report:
        print(line)
    return 0


def cmd_convert(args) -> int:
    from ..tools.peft_native import from_peft, is_peft_dir, to_peft

    if is_peft_dir(args.source):
        report = from_peft(args.source, args.out, overwrite=args.overwrite, model=args.model)
    else:
        if args.model:
            raise UniLoraError("--model goes with a PEFT VeRA source (its layers' input sizes); a unilora adapter "
                               "records its own layout")
        report = to_peft(args.source, args.out, overwrite=args.overwrite)
    for line in report:
        print(line)
    return 0


def cmd_compress(args) -> int:
    from ..tools.compress import compress, from_checkpoints, from_peft_lora, peft_fan_in_fan_out, save_compressed
    from ..store.io import ADAPTER_FILES
    from ..store.writing import check_writable

    check_writable(Path(args.out), ADAPTER_FILES, args.overwrite, "adapter")
    if args.targets and (args.adapter or args.peft_lora):
        raise UniLoraError("--targets chooses the layers of a full fine-tune (--finetuned-model, or checkpoints); the "
                           "compact adapter of a LoRA teacher adapts the layers that LoRA adapted: drop --targets")
    if args.adapter or args.data or args.finetuned_model:
        return _compress_by_distillation(args)
    given = [option for option, value in _distillation_options(args) if value is not None]
    if given:  # a weight-space fit would silently ignore them: the user most likely meant to distil
        one = len(given) == 1
        raise UniLoraError(f"{', '.join(given)} {'is a distillation option' if one else 'are distillation options'}: "
                           f"give --data (the texts to match the teacher on) to distil, or drop {'it' if one else 'them'} "
                           "for a weight-space fit")
    if bool(args.peft_lora) == bool(args.base_weights or args.finetuned_weights):
        raise UniLoraError("give either --peft-lora DIR or both --base-weights and --finetuned-weights")
    if args.peft_lora:
        updates = from_peft_lora(args.peft_lora)
        source, rank = f"peft-lora:{args.peft_lora}", args.rank or updates[0].a.shape[0]
        fan_in_fan_out = peft_fan_in_fan_out(args.peft_lora)
    else:
        if not (args.base_weights and args.finetuned_weights):
            raise UniLoraError("--base-weights and --finetuned-weights go together")
        rank = args.rank or 8
        updates = from_checkpoints(args.base_weights, args.finetuned_weights, _targets(args.targets or "query,value"),
                                   rank)
        source, fan_in_fan_out = f"checkpoints:{args.base_weights}|{args.finetuned_weights}", False
    args.rank = rank
    config = _adapter_config(args, sorted({u.name for u in updates}), auto_vector_length=True)
    projection, layout, report = compress(updates, config, steps=args.steps, lr=args.lr)
    config = projection.config  # with the chosen VB-LoRA b
    save_compressed(projection, layout, config, args.out, source, fan_in_fan_out, overwrite=args.overwrite)
    print(f"wrote {config.method} adapter {args.out}: {len(updates)} layers, rank {rank}")
    print(f"relative error of ΔW (Frobenius, all layers): closed form {report['relative_error_closed_form']:.4f}"
          + (f", after {args.steps} refinement steps {report['relative_error_refined']:.4f}" if args.steps else ""))
    print(f"size: {report['stored_params']:,} stored params vs {report['original_params']:,} LoRA params "
          f"(ratio {report['size_ratio']:.4f})")
    error = report["relative_error_refined"] if args.steps else report["relative_error_closed_form"]
    if error > COMPRESS_ERROR_WARNING:
        _warn(f"relative error {error:.2f} > {COMPRESS_ERROR_WARNING}: the compressed adapter keeps little of the "
              "source's update, so it will behave much like the base model; a larger --theta-dim keeps more "
              "(d = D is exact), or train a small adapter on the task itself with `unilora finetune`")
    return 0


def _distillation_options(args) -> list[tuple[str, object]]:
    """The options of `compress` that only distillation reads, with their values (None: not given)."""
    names = ("model", "label_names", "temperature", "hidden_weight", "hidden_layers", "epochs", "batch_size",
             "group_by_length", "eval_every", "max_length", "group_lr", "train_limit", "test_limit", "test_data")
    return [("--" + name.replace("_", "-"), getattr(args, name)) for name in names]


def _compress_by_distillation(args) -> int:
    from dataclasses import asdict

    from ..models.backbones import is_embedded
    from ..data.text import has_labels
    from ..training import distill as teachers
    from ..training.distill import distill, peft_teacher_kind
    from ..training.recipes import METHOD_DEFAULTS, distillation_group_lrs
    from ..training.loop import TrainSettings

    if sum(map(bool, (args.adapter, args.peft_lora, args.finetuned_model))) != 1 or args.base_weights \
            or args.finetuned_weights:
        raise UniLoraError("distillation takes one teacher: --adapter DIR (an adapter from `unilora finetune`), "
                           "--peft-lora DIR (a PEFT LoRA: on a causal LM, or a classifier's `unilora export` with "
                           "head.safetensors) or --finetuned-model DIR (a fully fine-tuned causal LM, with --model BASE)")
    if args.data is None and not args.adapter:
        raise UniLoraError(f"{'--peft-lora' if args.peft_lora else '--finetuned-model'} with distillation needs "
                           "--data: the texts to match the teacher on")
    if args.finetuned_model and not args.model:
        raise UniLoraError("--finetuned-model needs --model BASE: the model it was fine-tuned from, which the "
                           "compact adapter is trained on")
    dataset, label_names = None, None
    peft_classifier = bool(args.peft_lora) and peft_teacher_kind(args.peft_lora) == "seq-cls"
    if args.label_names and not peft_classifier:
        raise UniLoraError("--label-names names the classes of a PEFT LoRA classifier (--peft-lora); other teachers "
                           "record their classes or have none: drop the option")
    if peft_classifier:
        # a PEFT classifier: its classes, in the order of its head's outputs, come from labelled data or the option
        if has_labels(args.data, args.label_column):
            dataset = _load_data(args, "seq-cls")
            label_names = dataset.label_names
        elif args.label_names:
            label_names = args.label_names.split(",")
        else:
            raise UniLoraError("a PEFT LoRA teacher with unlabelled texts needs --label-names A,B,... (its classes, "
                               "in the order of its head's outputs)")
    if args.adapter:
        tokenizer, teacher = teachers.teacher_from_adapter(args.adapter, args.model)
    elif args.peft_lora:
        tokenizer, teacher = teachers.teacher_from_peft_lora(args.peft_lora, label_names, args.model)
    else:  # the SVD of its change is the weight-space start, at the student's rank
        rank = args.rank or METHOD_DEFAULTS[args.method].get("rank", 8)
        tokenizer, teacher = teachers.teacher_from_finetuned(args.finetuned_model, args.model,
                                                             _targets(args.targets or "all-linear"), rank)
    dataset = dataset or _distillation_data(args, teacher)
    # the method's own defaults (its rank included), not the teacher's: the student is trained, not fitted
    # VB-LoRA's b as `finetune` picks it: the recipe's on the embedded model, else fitted to the model
    config = _adapter_config(args, [u.name for u in teacher.updates],
                             auto_vector_length=not is_embedded(teacher.record["model"]))
    given = dict(args.group_lr or [])
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size,
                             group_lrs={**distillation_group_lrs(teacher.kind, args.method), **given},
                             max_length=args.max_length or teacher.record.get("max_length")
                             or TASK_DEFAULTS[teacher.kind][1],
                             seed=args.seed, progress=not args.no_progress, fit_rates="theta" not in given,
                             eval_every=args.eval_every, group_by_length=args.group_by_length)
    causal = teacher.kind == "causal-lm"
    started = time.time()
    student, report = distill(teacher, tokenizer, config, dataset, settings, fit_steps=args.steps,
                              temperature=args.temperature, hidden_weight=args.hidden_weight, fit_lr=args.lr,
                              hidden_layers=args.hidden_layers)
    before, after = report["before"], report["after"]
    summary = {"weight_space_fit": before, "distilled": {k: v for k, v in after.items() if k != "epoch"},
               "base_model": report["base"], "kept_gain": report["kept_gain"],
               "kept_gain_interval": report["kept_gain_interval"],
               "kept_gain_by_measure": report["kept_gain_by_measure"], "settings": asdict(settings),
               "temperature": report["temperature"], "hidden_weight": report["hidden_weight"],
               "hidden_layers": report["hidden_layers"],
               "teacher_pass_seconds": round(report["teacher_pass_seconds"], 2),
               "train_examples": len(dataset.train if causal else dataset.train_texts),
               "seconds": round(time.time() - started, 1)}
    # the teacher's record first: `evaluate` then scores the student on the teacher's own task
    record = {**report["record"], **teacher.record, "max_length": report["max_length"],
              "compressed_from": teacher.source, "distillation": summary}
    student.save_pretrained(args.out, task=record, overwrite=args.overwrite)
    unit, held_out = ("predicted token", "examples") if causal else ("text", "texts")
    print(f"wrote {student.adapter_config.method} adapter {args.out}: {student.stored_param_count():,} stored params "
          f"vs {sum(u.a.numel() + u.b.numel() for u in teacher.updates):,} in the teacher's A and B"
          + (" (head carried)" if teacher.head else ""))
    what = "the teacher's most likely next token" if causal else "the teacher"
    print(f"agreement with {what} on {report['test_examples']:,} held-out {held_out}: weight-space fit "
          f"{before['agreement']:.4f}, after distillation {after['agreement']:.4f}")
    print(f"KL(teacher || student), nats per {unit}: weight-space fit {before['kl_to_teacher']:.3e}, after "
          f"distillation {after['kl_to_teacher']:.3e}")
    def kept_text(measure: str) -> str:
        gain = report["kept_gain_by_measure"].get(measure, {"kept": None, "interval": None})
        return _kept_gain_text(gain["kept"], gain["interval"], report["test_examples"], held_out)

    if "student_accuracy" in after:
        print(f"accuracy: teacher {after['teacher_accuracy']:.4f}, student {after['student_accuracy']:.4f} "
              f"(weight-space fit {before['student_accuracy']:.4f}, base model with the teacher's head "
              f"{report['base']['student_accuracy']:.4f}){kept_text('accuracy')}")
        # the same gain measured finer: every text's loss moves, where accuracy counts the few that flip
        print(f"eval loss on the labels: teacher {after['teacher_eval_loss']:.4f}, student {after['eval_loss']:.4f} "
              f"(weight-space fit {before['eval_loss']:.4f}, base model with the teacher's head "
              f"{report['base']['eval_loss']:.4f}){kept_text('eval_loss')}")
    elif "eval_loss" in after:
        print(f"eval loss: teacher {after['teacher_eval_loss']:.4f}, student {after['eval_loss']:.4f} (weight-space "
              f"fit {before['eval_loss']:.4f}, base model {report['base']['eval_loss']:.4f}){kept_text('eval_loss')}")
        metric = (report["record"].get("metric") or "")
        if metric in after:
            print(f"{metric}: teacher {after[f'teacher_{metric}']:.4f}, student {after[metric]:.4f}")
    print(f"time: {after['train_seconds']:.0f} s training the student ({summary['teacher_pass_seconds']:.0f} s of it the "
          f"teacher's pass over the training texts), {summary['seconds']:.0f} s in all "
          f"(the teacher's and the base model's scores, the weight-space fit and every evaluation included)")
    return 0


def _distillation_data(args, teacher):
    """The texts to match the teacher on: --data (labelled or not), else the data it was trained on."""
    from ..data.text import BUILTIN_DATASETS, has_labels, texts_dataset
    from ..data.lm import BUILTIN_LM_TASKS

    causal = teacher.kind == "causal-lm"
    if args.data in (BUILTIN_DATASETS if causal else BUILTIN_LM_TASKS):
        raise UniLoraError(f"'{args.data}' is {'classification' if causal else 'causal-LM'} data and the teacher is a "
                           f"{'causal LM' if causal else 'classifier'}; give it "
                           f"{'text, prompt/completion or chat data' if causal else 'texts to classify'}")
    if causal:
        if args.data:
            return _load_data(args, "causal-lm")
        from ..training.causal_lm import lm_dataset_of

        return lm_dataset_of(teacher.record, args.adapter).limited(args.train_limit, args.test_limit, seed=0)
    from ..training.classification import dataset_of

    if args.data is not None and has_labels(args.data, args.label_column):
        return _load_data(args, "seq-cls")
    dataset = (texts_dataset(args.data, args.text_column, teacher.record["label_names"]) if args.data
               else dataset_of(teacher.record, args.adapter))
    return dataset.limited(args.train_limit, args.test_limit, seed=0)


def _kept_gain_text(kept: float | None, interval: tuple[float, float] | None, texts: int, held_out: str) -> str:
    from ..training.gain import LEVEL

    if kept is None:
        return ""
    text = f"; the student keeps {100 * kept:.1f} % of the teacher's gain over the base"
    if interval is None:
        return text + f" (the teacher's gain is within the noise of {texts:,} held-out {held_out})"
    low, high = interval
    return text + f" ({100 * LEVEL:.0f} % interval over the held-out {held_out}: {100 * low:.1f}-{100 * high:.1f} %)"


# above this relative error of ΔW a weight-space fit keeps too little to be worth using
COMPRESS_ERROR_WARNING = 0.5


def cmd_count(args) -> int:
    from ..tools.counting import count_for_arch
    from ..training.recipes import PAPER_DEFAULTS

    config = _adapter_config(args, ["query", "value"], defaults=PAPER_DEFAULTS)
    options = {k: v for k, v in config.to_dict().items() if k not in ("target_modules", "modules_to_save")}
    result = count_for_arch(args.arch, args.targets, **options)
    for key, value in result.items():
        print(f"{key}: {value}")
    print(result["stored_params"])
    return 0


def cmd_demo(args) -> int:
    """Train a small adapter in a few CPU minutes: a Rotten Tomatoes classifier on the embedded
    MiniLM, or (causal-lm) BBC News headlines on SmolLM2, showing a held-out generation before and after."""
    if args.task == "causal-lm":
        from ..training.causal_lm import demo_causal_lm

        return demo_causal_lm(args.method, args.out, args.train_limit or 96, args.test_limit or 24)
    argv = ["finetune", "--method", args.method, "--data", "rotten_tomatoes", "--train-limit",
            str(args.train_limit or 3000), "--test-limit", str(args.test_limit or 1000), "--epochs", "1",
            "--out", args.out, "--overwrite"]
    return main(argv)


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line, like every other input error (argparse prints usage too)."""

    def error(self, message: str):
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _add_group_by_length(p, default: bool | None, why: str) -> None:
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=default,
                   help=f"batches of examples of similar length, in random order: less padding, so cheaper steps "
                   f"(default: {why})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unilora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="train an adapter: text classification or causal LM")
    p.add_argument("--task", choices=TASKS, help="seq-cls (an encoder and a head) or causal-lm; default: "
                   "from the data (labels: seq-cls; text, prompt/completion, chat: causal-lm)")
    p.add_argument("--model", help="local folder, hub name, or an embedded model: all-MiniLM-L6-v2 (seq-cls "
                   "default), SmolLM2-135M-Instruct (causal-lm default)")
    _add_data_options(p)
    _add_lm_options(p)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="causal LM, plain text: pack documents into full --max-length blocks")
    _add_adapter_options(p)
    p.add_argument("--targets", default="all-linear", help="comma-separated name suffixes, a regex, or all-linear")
    p.add_argument("--epochs", type=_positive_int, help="default: seq-cls, enough for about 120 optimizer steps "
                   "(1 to 40 epochs); causal-lm, 2")
    p.add_argument("--batch-size", type=_positive_int, help="default: seq-cls, 32 from 1,000 training examples, 16 "
                   "from 300, else 8; causal-lm, 8")
    _add_group_by_length(p, False, "off, the rates were tuned on shuffled batches")
    p.add_argument("--warmup-ratio", type=_ratio, default=0.06, help="share of the steps spent warming up the "
                   "learning rate, then linear decay (default 0.06)")
    p.add_argument("--eval-every", type=_positive_int, help="epochs between evaluations on the test split; the "
                   "last epoch is always evaluated (default: every epoch up to 4 epochs, else about 4 in all)")
    p.add_argument("--max-grad-norm", type=_non_negative_float, help="clip the gradient norm at this value "
                   "(default 0: off)")
    p.add_argument("--max-length", type=_positive_int, help="tokens per example, clamped to the model's limit "
                   "(default 64 for seq-cls, 256 for causal-lm)")
    p.add_argument("--lr", type=_positive_float, help="one learning rate for every adapter group (default: per method)")
    p.add_argument("--head-lr", type=_positive_float, help="classifier head learning rate")
    p.add_argument("--group-lr", type=_group_lr, action="append", metavar="NAME=RATE", help="one group's rate; repeat for more, e.g. --group-lr bank=1e-3 --group-lr logits=1e-2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default runs/METHOD-DATA-seedN); must be new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (only files unilora wrote)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="a saved adapter on a test split: accuracy (seq-cls); loss, perplexity "
                       "and the data's metric (causal-lm)")
    p.add_argument("adapter")
    p.add_argument("--model", help="override the base model recorded in the adapter")
    _add_data_options(p, data_help=DATA_HELP + " (default: the data recorded in the adapter)")
    _add_lm_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="generate text with a causal-LM adapter")
    p.add_argument("adapter")
    p.add_argument("--prompt", help="one prompt (sent as a user turn when the adapter learned from chat data)")
    p.add_argument("--prompts", help="JSONL file: one {\"prompt\": ...} or {\"messages\": [...]} per line")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights first (no adapter overhead)")
    p.add_argument("--model", help="override the base model recorded in the adapter")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="method, counts and bytes of an adapter; VB-LoRA selection plots")
    p.add_argument("adapter")
    p.add_argument("--png", help="where to save the VB-LoRA plot (default: ADAPTER-selection.png)")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a standard PEFT LoRA adapter built from the method's A and B")
    p.add_argument("adapter")
    p.add_argument("--to", choices=("peft-lora",), default="peft-lora")
    p.add_argument("out")
    p.add_argument("--rank", type=_positive_int, help="pad A and B with zeros to this rank (default: the trained rank; "
                   "vLLM serves any rank up to its --max-lora-rank)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in OUT (only files unilora wrote)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="our Uni-LoRA / VeRA / VB-LoRA adapter as PEFT's own UNILORA / VERA / VBLORA "
                       "directory, or a PEFT one as ours (exact both ways)")
    p.add_argument("source", help="a unilora adapter, or a PEFT VBLORA, UNILORA (save_indices=True) or VERA "
                   "(save_projection=True, with --model) directory")
    p.add_argument("out")
    p.add_argument("--model", help="PEFT VeRA source only: the base model (name or path) it was trained on")
    p.add_argument("--overwrite", action="store_true", help="replace a previous conversion in OUT (only files unilora wrote)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compress", help="fit a compact adapter to a PEFT LoRA adapter or to a full fine-tune; with "
                       "--adapter or --data, train it to match the source model's outputs (distillation)")
    p.add_argument("out")
    p.add_argument("--adapter", help="teacher: an adapter of ours (any method, a classifier or a causal LM) saved "
                   "by `finetune`")
    p.add_argument("--peft-lora", help="a PEFT LoRA adapter directory (a teacher with --data: on a causal LM, or a "
                   "classifier's export with head.safetensors)")
    p.add_argument("--finetuned-model", help="teacher: a fully fine-tuned causal LM (model folder or hub name), "
                   "with --model BASE and --data")
    p.add_argument("--model", help="distillation: the teacher's base model (default: the one it records)")
    p.add_argument("--label-names", help="distillation from --peft-lora on unlabelled texts: the teacher's classes, "
                   "comma-separated, in the order of its head's outputs")
    p.add_argument("--temperature", type=_positive_float, help="distillation: softening of the teacher's "
                   "probabilities (default: 1 for a classifier, 2 for a causal LM)")
    p.add_argument("--hidden-weight", type=_non_negative_float, help="distillation of a classifier: also match "
                   "the teacher's pooled features (the head's input), with this weight beside the KL of the logits; "
                   "the squared error is in units of the features' variance (default: 1; 0 turns it off)")
    p.add_argument("--hidden-layers", choices=HIDDEN_LAYERS, help="distillation of a classifier: the pooled "
                   "features matched, the last layer's (the head's input), or also every inner encoder layer's, each "
                   f"in units of its own variance, their mean at the same weight (default: {DEFAULT_HIDDEN_LAYERS})")
    p.add_argument("--epochs", type=_positive_int, help="distillation (default: chosen like finetune's)")
    p.add_argument("--batch-size", type=_positive_int, help="distillation (default: chosen like finetune's)")
    _add_group_by_length(p, None, "on where the padding it saves pays for more epochs than the plan's and "
                         "--epochs is not given; then as many epochs as cost no more than the plan's shuffled ones")
    p.add_argument("--eval-every", type=_positive_int, help="distillation: epochs between evaluations on the test "
                   "split; the last epoch is always evaluated (default: chosen like finetune's)")
    p.add_argument("--max-length", type=_positive_int, help="distillation: tokens per example (default: the "
                   "teacher's, else 64 for a classifier and 256 for a causal LM)")
    p.add_argument("--group-lr", type=_group_lr, action="append", metavar="NAME=RATE", help="distillation: one "
                   "group's rate (default: the method's; a classifier's VB-LoRA logits and Uni-LoRA θ faster, "
                   "recipes.DISTILL_GROUP_LRS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    _add_data_options(p, data_help="distillation: the texts to match the teacher on (its training data by default "
                      "for --adapter); labels, where present, only score teacher and student")
    p.add_argument("--base-weights", help="base model .safetensors (with --finetuned-weights: ΔW by truncated SVD)")
    p.add_argument("--finetuned-weights", help="fully fine-tuned .safetensors of the same model")
    p.add_argument("--targets", help="with checkpoints: module-name suffixes to compress (default query,value); "
                   "with --finetuned-model: the layers to adapt (default all-linear)")
    p.add_argument("--steps", type=_non_negative_int, default=0, help="least-squares refinement steps on ΔW (Adam)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous adapter in OUT (only files unilora wrote)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="refinement learning rate")
    _add_adapter_options(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("count", help="stored parameters of a method on RoBERTa-base/large (config only; "
                       "defaults are the papers' settings)")
    p.add_argument("--arch", choices=("roberta-base", "roberta-large"), required=True)
    p.add_argument("--targets", choices=("qv", "all"), default="qv")
    _add_adapter_options(p)
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("demo", help="train and evaluate a small adapter in a few CPU minutes (Rotten Tomatoes "
                       "classification, or BBC News headlines with --task causal-lm)")
    p.add_argument("--task", choices=TASKS, default="seq-cls")
    p.add_argument("--method", choices=method_names(), default="unilora")
    p.add_argument("--train-limit", type=_positive_int, help="training examples (default 3000; causal-lm 96)")
    p.add_argument("--test-limit", type=_positive_int, help="test examples (default 1000; causal-lm 24)")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or an argument error already printed in one line
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except UniLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a user's path: missing, unreadable, read-only, full disk
        where = f" '{err.filename}'" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
