"""The commands: each turns its options into one library call and prints what came back. Checks of
which options go together live here; everything a Python caller would need lives in the library."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from ..core.config import command_line_options
from ..core.errors import UniLoraError
from ..core.extras import require
from ..core.notes import note
from ..data.sources import DataSpec
from ..models.backbones import EMBEDDED_MODEL
from ..models.embedded_llm import EMBEDDED_LLM
from ..serve.settings import ServeSettings
from ..tools.compress import weight_space_fit
from ..tools.counting import count_for_arch
from ..tools.export import export_peft_lora, refuse_overlap
from ..tools.merged_export import write_merged_model
from ..tools.inspection import describe, save_selection_plot
from ..tools.peft_native import from_peft, is_peft_dir, to_peft
from ..models.quantization import quantization_of
from ..training.causal_lm import generate_from_adapter, open_lm_adapter, prompts_from_file
from ..training.distill_run import ONE_TEACHER, DistillRun, distill_adapter
from ..training.gain import LEVEL
from ..training.runs import FinetuneRun, run_evaluate, run_finetune



def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def targets(text: str):
    """--targets: "all-linear", a regex (any of *()[]|\\^$), or comma-separated name suffixes."""
    if text == "all-linear" or any(c in text for c in "*()[]|\\^$"):
        return text
    return [t for t in text.split(",") if t]


def adapter_fields(args) -> dict:
    """The AdapterConfig fields the options give (the adapter's seed only where --adapter-seed is)."""
    fields = {key: getattr(args, key, None) for key in ("rank", *command_line_options())}
    if getattr(args, "adapter_seed", None) is not None:
        fields["seed"] = args.adapter_seed
    return fields


def data_spec(args) -> DataSpec:
    return DataSpec(args.data, args.test_data, args.text_column, args.label_column, args.train_limit,
                    args.test_limit, getattr(args, "metric", None), args.split, args.data_config, args.streaming)


def cmd_finetune(args) -> int:
    # with --json, stdout holds the JSON alone: the epochs' lines go to stderr beside the notes
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        run = _finetune(args)
    if args.json:
        if run.metrics:  # rank 0 only under torchrun
            print(json.dumps(run.metrics, indent=2))
    else:
        print_finetune(run)
    return 0


def _finetune(args) -> FinetuneRun:
    return run_finetune(data_spec(args), task=args.task, model=args.model, method=args.method,
                        targets=targets(args.targets), adapter=adapter_fields(args), seed=args.seed, lr=args.lr,
                        head_lr=args.head_lr, group_lrs=dict(args.group_lr or []), max_length=args.max_length,
                        out=args.out, overwrite=args.overwrite, epochs=args.epochs, batch_size=args.batch_size,
                        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                        packing=args.packing, max_new_tokens=args.max_new_tokens,
                        group_by_length=args.group_by_length, progress=not args.no_progress, quantize=args.quantize)


def print_finetune(run: FinetuneRun) -> None:
    metrics, classify = run.metrics, run.task == "seq-cls"
    if not metrics:  # a rank other than 0 under torchrun
        return
    folder = run.out / "adapter"
    stored, trained = metrics["stored_params"], metrics["trainable_params"] - metrics["head_params"]
    counts = f"{stored:,} stored params" + (f" + head {metrics['head_params']:,}" if classify else "")
    if trained != stored:
        counts += f"; {trained:,} trained" + (f": {metrics['stored_note']}" if metrics.get("stored_note") else "")
    weights, config = ((folder / name).stat().st_size for name in ("adapter_model.safetensors", "adapter_config.json"))
    print(f"adapter: {folder}  (on disk: weights {weights:,} bytes + config {config:,}; {counts})")
    print(score_line(metrics, run.dataset.metric if not classify else None))


def score_line(scores: dict, metric: str | None) -> str:
    """The one line `finetune` and `evaluate` both end with: a classifier's accuracy, or a causal LM's
    eval loss, perplexity and the data's metric."""
    if "test_accuracy" in scores:
        return f"test accuracy: {scores['test_accuracy']:.4f}"
    return (f"eval loss: {scores['eval_loss']:.4f} (perplexity {scores['perplexity']:.2f})"
            + (f", {metric}: {scores[metric]:.4f}" if metric and metric in scores else ""))


def cmd_evaluate(args) -> int:
    result = run_evaluate(args.adapter, data_spec(args), args.model, args.max_new_tokens, quantize=args.quantize)
    for said in result.pop("notes"):
        note(said)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    metric = next((m for m in ("rougeL", "accuracy", "exact_match") if m in result), None)
    examples = result.get("test_examples")
    print(score_line(result, metric) + (f"  ({examples:,} test examples of {result['dataset']})"
                                         if examples and result.get("dataset") else ""))
    return 0


def cmd_generate(args) -> int:
    if args.prompt is not None and not args.prompt.strip():
        raise UniLoraError("the prompt is empty; give some text with --prompt TEXT")
    if bool(args.prompt) == bool(args.prompts):
        raise UniLoraError("give either --prompt TEXT or --prompts FILE.jsonl")
    prompts = [args.prompt] if args.prompt else prompts_from_file(args.prompts)
    outputs = generate_from_adapter(args.adapter, prompts, args.max_new_tokens, merge=args.merge, model_name=args.model,
                                    quantize=args.quantize, merge_to=args.merge_to)
    for number, output in enumerate(outputs, 1):
        which = "" if args.prompt else f" for prompt {number}"
        if not output:
            note(f"the model ended its answer at once{which} (0 tokens before its end token)" if not output.new_tokens
                 else f"the answer{which} holds only special tokens or spaces ({output.new_tokens} tokens)")
        elif output.new_tokens >= args.max_new_tokens:
            note(f"the answer{which} was cut at --max-new-tokens {args.max_new_tokens}; raise it for the whole answer")
    if args.prompt:
        print(outputs[0])
    else:
        for prompt, output in zip(prompts, outputs):
            print(json.dumps({"prompt": prompt, "generation": output}, ensure_ascii=False))
    return 0


def cmd_inspect(args) -> int:
    info = describe(args.adapter)
    png = None
    if info["method"] == "vblora" and not args.no_plot:
        png = Path(args.png) if args.png else Path(str(Path(args.adapter).resolve()) + "-selection.png")
        folder = next(p for p in [png.parent, *png.parent.parents] if p.exists())
        require("plots", "the VB-LoRA selection plot", hint=", or pass --no-plot")
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
    if args.to == "merged":
        return export_merged(args)
    if args.merge_to or args.quantize:
        raise UniLoraError(f"--{'merge-to' if args.merge_to else 'quantize'} goes with --to merged; a PEFT LoRA export "
                           "holds the adapter alone")
    for line in export_peft_lora(args.adapter, args.out, rank=args.rank, overwrite=args.overwrite, model=args.model,
                                 base_model=args.base_name):
        print(line)
    return 0


def export_merged(args) -> int:
    if args.rank or args.base_name:
        raise UniLoraError(f"--{'rank' if args.rank else 'base-name'} goes with --to peft-lora; --to merged writes the "
                           "whole model with the adapter merged in")
    refuse_overlap(Path(args.adapter), Path(args.out))
    adapter, tokenizer, model = open_lm_adapter(args.adapter, args.model, args.quantize, "export --to merged")
    quantized = quantization_of(model)
    plain = model.merge_and_unload(to=args.merge_to or "float32")
    source = {"adapter": str(args.adapter), "base_model": getattr(plain.config, "_name_or_path", None) or args.model,
              "method": adapter.config.method, "quantize": quantized}
    for line in write_merged_model(plain, tokenizer, args.out, source, overwrite=args.overwrite):
        print(line)
    return 0


def cmd_convert(args) -> int:
    if is_peft_dir(args.source):
        if not args.save_projection:
            raise UniLoraError("--no-save-projection goes with writing PEFT TINYLORA; this source is already PEFT's")
        if args.base_name:
            raise UniLoraError("--base-name goes with writing PEFT's format; this source is already PEFT's")
        report = from_peft(args.source, args.out, overwrite=args.overwrite, model=args.model)
    else:
        report = to_peft(args.source, args.out, overwrite=args.overwrite, model=args.model,
                         save_projection=args.save_projection, base_name=args.base_name)
    for line in report:
        print(line)
    return 0


# the options of `compress` that only distillation reads
DISTILLATION_OPTIONS = ("model", "label_names", "temperature", "hidden_weight", "hidden_layers", "epochs", "batch_size",
                        "group_by_length", "eval_every", "max_length", "group_lr", "train_limit", "test_limit",
                        "test_data")


def cmd_compress(args) -> int:
    if args.adapter or args.data or args.finetuned_model:
        if args.base_weights or args.finetuned_weights:
            raise UniLoraError(ONE_TEACHER)
        print_distillation(distill_adapter(
            args.out, adapter=args.adapter, peft_lora=args.peft_lora, finetuned_model=args.finetuned_model,
            model=args.model, data=data_spec(args), label_names=args.label_names.split(",") if args.label_names else None,
            method=args.method, fields=adapter_fields(args), targets=targets(args.targets) if args.targets else None,
            temperature=args.temperature, hidden_weight=args.hidden_weight, hidden_layers=args.hidden_layers,
            fit_steps=args.steps, fit_lr=args.lr, group_lrs=dict(args.group_lr or []), max_length=args.max_length,
            seed=args.seed, overwrite=args.overwrite, epochs=args.epochs, batch_size=args.batch_size,
            eval_every=args.eval_every, group_by_length=args.group_by_length, progress=not args.no_progress))
        return 0
    given = ["--" + name.replace("_", "-") for name in DISTILLATION_OPTIONS if getattr(args, name) is not None]
    if given:  # a weight-space fit would silently ignore them: the user most likely meant to distil
        one = len(given) == 1
        raise UniLoraError(f"{', '.join(given)} {'is a distillation option' if one else 'are distillation options'}: "
                           f"give --data (the texts to match the teacher on) to distil, or drop {'it' if one else 'them'} "
                           "for a weight-space fit")
    report = weight_space_fit(args.out, peft_lora=args.peft_lora, base_weights=args.base_weights,
                              finetuned_weights=args.finetuned_weights,
                              targets=targets(args.targets) if args.targets else None, method=args.method,
                              fields=adapter_fields(args), seed=args.seed, steps=args.steps, lr=args.lr,
                              overwrite=args.overwrite)
    print(f"wrote {report['method']} adapter {args.out}: {report['layers']} layers, rank {report['rank']}")
    print(f"relative error of ΔW (Frobenius, all layers): closed form {report['relative_error_closed_form']:.4f}"
          + (f", after {args.steps} refinement steps {report['relative_error_refined']:.4f}" if args.steps else ""))
    print(f"size: {report['stored_params']:,} stored params vs {report['original_params']:,} LoRA params "
          f"(ratio {report['size_ratio']:.4f})")
    if report["warning"]:
        warn(report["warning"])
    return 0


def print_distillation(run: DistillRun) -> None:
    report, summary, teacher = run.report, run.summary, run.teacher
    before, after = report["before"], report["after"]
    causal = teacher.kind == "causal-lm"
    unit, held_out = ("predicted token", "examples") if causal else ("text", "texts")
    print(f"wrote {run.student.adapter_config.method} adapter {run.out}: {run.student.stored_param_count():,} stored "
          f"params vs {sum(u.a.numel() + u.b.numel() for u in teacher.updates):,} in the teacher's A and B"
          + (" (head carried)" if teacher.head else ""))
    what = "the teacher's most likely next token" if causal else "the teacher"
    print(f"agreement with {what} on {report['test_examples']:,} held-out {held_out}: weight-space fit "
          f"{before['agreement']:.4f}, after distillation {after['agreement']:.4f}")
    print(f"KL(teacher || student), nats per {unit}: weight-space fit {before['kl_to_teacher']:.3e}, after "
          f"distillation {after['kl_to_teacher']:.3e}")

    def kept_text(measure: str) -> str:
        gain = report["kept_gain_by_measure"].get(measure, {"kept": None, "interval": None})
        return kept_gain_text(gain["kept"], gain["interval"], report["test_examples"], held_out)

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


def kept_gain_text(kept: float | None, interval: tuple[float, float] | None, texts: int, held_out: str) -> str:
    if kept is None:
        return ""
    text = f"; the student keeps {100 * kept:.1f} % of the teacher's gain over the base"
    if interval is None:
        return text + f" (the teacher's gain is within the noise of {texts:,} held-out {held_out})"
    low, high = interval
    return text + f" ({100 * LEVEL:.0f} % interval over the held-out {held_out}: {100 * low:.1f}-{100 * high:.1f} %)"


def cmd_count(args) -> int:
    fields = adapter_fields(args)
    result = count_for_arch(args.arch, args.targets, args.method, **fields)
    for key, value in result.items():
        print(f"{key}: {value}")
    print(result["stored_params"])
    return 0


def cmd_serve(args) -> int:
    if args.replicas > 1 and not args.ray:
        raise UniLoraError("--replicas goes with --ray (one process serves with one model)")
    require("serve", "`unilora serve`")
    if args.ray:
        require("ray", "`unilora serve --ray`")

    model = args.model or (EMBEDDED_LLM if args.task == "causal-lm" else EMBEDDED_MODEL)
    settings = ServeSettings(
        adapters=args.adapters, model=model, task=args.task, served_model_name=args.served_model_name,
        api_key=args.api_key or (None if args.api_keys else os.environ.get("UNILORA_API_KEY") or None),
        api_keys=args.api_keys, jobs_dir=args.jobs_dir, max_file_mb=args.max_file_mb,
        max_training_jobs=args.max_training_jobs, training_share=args.training_share,
        tenant_max_jobs=args.tenant_max_jobs, tenant_max_file_mb=args.tenant_max_file_mb, max_resident=args.max_resident,
        max_resident_bytes=int(args.max_resident_mb * 2**20), factor_cache_bytes=int(args.factor_cache_mb * 2**20),
        max_batch=args.max_batch, max_iteration_tokens=args.max_iteration_tokens, max_queue=args.max_queue, max_new_tokens_limit=args.max_new_tokens_limit,
        max_body_bytes=args.max_body_kb * 1024, request_timeout=args.request_timeout,
        allow_runtime_loading=args.allow_runtime_loading, drain_timeout=args.drain_timeout, device=args.device,
        dtype=args.dtype, quantize=None if args.quantize in (None, "none") else args.quantize)
    if args.ray:
        from ..deploy.ray_app import serve_with_ray  # ray is the `ray` extra

        serve_with_ray(settings, host=args.host, port=args.port, replicas=args.replicas)
    else:
        from ..serve.server import serve  # fastapi and uvicorn: the `serve` extra

        serve(settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0
