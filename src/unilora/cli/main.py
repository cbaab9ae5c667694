"""The `unilora` command: finetune, evaluate, generate, inspect, export, convert, compress, count, serve, demo.

This module parses (one line and exit code 2 for any bad argument) and dispatches to commands.py,
which calls the library and prints."""

from __future__ import annotations

import argparse
import difflib
import math
import sys

from .._version import __version__
from ..core.config import Choice, command_line_options
from ..core.errors import UniLoraError
from ..core.notes import render
from ..core.registry import method_names, method_summaries
from ..core.tasks import METRICS, TASK_KINDS
from ..training.recipes import DEFAULT_HIDDEN_LAYERS, HIDDEN_LAYERS
from .commands import (
    cmd_compress,
    cmd_convert,
    cmd_count,
    cmd_evaluate,
    cmd_export,
    cmd_finetune,
    cmd_generate,
    cmd_inspect,
    cmd_serve,
)
from .demo import cmd_demo

DESCRIPTION = ("The `unilora` command: finetune, evaluate, generate, inspect, export, convert, compress, count, "
               "serve, demo.")


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


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {value}")
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


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got '{text}'")
    return value


def _group_lr(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not (name and sep):
            raise ValueError
        return name, _positive_float(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"--group-lr expects NAME=RATE (e.g. bank=1e-3), got '{text}'") from None


def _method_option_type(check):
    def parse(text: str):
        try:
            return check.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _add_adapter_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("adapter (defaults per method: see unilora.training.recipes)")
    g.add_argument("--method", choices=method_names(), default="unilora",
                   help="what trains and what is stored for each: `unilora methods`")
    g.add_argument("--rank", type=_positive_int)
    # each method's own options, as its file declares them (core/config.option with a help)
    for name, (check, help_text, methods) in command_line_options().items():
        kind = {"choices": check.values} if isinstance(check, Choice) else {"type": _method_option_type(check)}
        g.add_argument("--" + name.replace("_", "-"), dest=name, help=f"{', '.join(methods)}: {help_text}", **kind)
    g.add_argument("--adapter-seed", type=int, help="seed of the projection (default: --seed)")


DATA_HELP = ("classification: rotten_tomatoes (default), bbc_news, or a CSV/JSONL file with text and label columns; "
             "causal LM: bbc_headlines, rotten_tomatoes_instruct, a .txt file, or JSONL with text, "
             "prompt/completion or chat messages; either: a Hugging Face dataset (a hub id, a save_to_disk folder, "
             "a .parquet or .arrow file)")


def _add_data_options(parser: argparse.ArgumentParser, data_help: str = DATA_HELP) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data", help=data_help)
    g.add_argument("--test-data", help="separate test file or `datasets` source (default: the set's test split, else "
                   "a seeded 20%% split)")
    g.add_argument("--text-column", default="text")
    g.add_argument("--label-column", default="label")
    g.add_argument("--split", default="train", help="a `datasets` source's training split (default: train; the "
                   "test split is its test or validation split)")
    g.add_argument("--data-config", help="a hub dataset's named configuration")
    g.add_argument("--streaming", action="store_true", help="read a `datasets` source (hub id, .parquet, .arrow) as a "
                   "stream: causal-LM data larger than memory, never loaded whole (no packing)")
    g.add_argument("--train-limit", type=_positive_int, help="train on a seeded random subset of this size")
    g.add_argument("--test-limit", type=_positive_int, help="evaluate on a seeded random subset of this size")


def _add_lm_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("causal LM")
    g.add_argument("--metric", choices=METRICS, help="score generated test answers: rougeL, accuracy (first word), "
                   "exact_match (default: the built-in task's metric; none for files)")
    g.add_argument("--max-new-tokens", type=_positive_int, help="tokens generated per test answer (default: the "
                   "longest reference answer + 4)")
    _add_quantize(g)


QUANTIZE_HELP = ("the base's linear layers in 8 or 4 bits, the adapter beside them in full precision (QLoRA's "
                 "setup): int8, int4 (torchao), nf4, fp4 (bitsandbytes); the `quant` extra")


def _add_quantize(parser, recorded: bool = False) -> None:
    parser.add_argument("--quantize", choices=("int8", "int4", "nf4", "fp4", "none"),
                        help=QUANTIZE_HELP + ("; default: as the adapter was trained ('none': not quantized)"
                                              if recorded else ""))


def _add_merge_to(parser, help: str) -> None:
    parser.add_argument("--merge-to", choices=("float32", "bfloat16"), help=help)


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line, like every other input error (argparse prints usage too)."""

    def error(self, message: str):
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _add_group_by_length(p, default: bool | None, why: str) -> None:
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=default,
                   help=f"batches of examples of similar length, in random order: less padding, so cheaper steps "
                   f"(default: {why})")


def methods_epilog() -> str:
    width = max(map(len, method_names()))
    return "methods (--method):\n" + "\n".join(f"  {name:<{width}}  {summary}"
                                                for name, summary in method_summaries().items())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unilora", description=DESCRIPTION, epilog=methods_epilog(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"unilora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # the subcommands' parsers, for the hint on an unknown option

    p = sub.add_parser("finetune", help="train an adapter: text classification or causal LM")
    p.add_argument("--task", choices=TASK_KINDS, help="seq-cls (an encoder and a head) or causal-lm; default: "
                   "from the data (labels: seq-cls; text, prompt/completion, chat: causal-lm)")
    p.add_argument("--model", help="local folder, hub name, or an embedded model: all-MiniLM-L6-v2 (seq-cls "
                   "default), SmolLM2-135M-Instruct (causal-lm default)")
    _add_data_options(p)
    _add_lm_options(p)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="causal LM, plain text: pack documents into full --max-length blocks")
    _add_adapter_options(p)
    p.add_argument("--targets", "--target-modules", dest="targets", default="all-linear",
                   help="the layers to adapt (PEFT's target_modules): comma-separated name suffixes, a regex, or "
                   "all-linear")
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
    p.add_argument("--json", action="store_true", help="print the run's metrics as one JSON object (for scripts) "
                   "instead of the summary lines")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="a saved adapter on a test split: accuracy (seq-cls); loss, perplexity "
                       "and the data's metric (causal-lm)")
    p.add_argument("adapter")
    p.add_argument("--model", help="override the base model recorded in the adapter")
    p.add_argument("--json", action="store_true", help="print every score as one JSON object (for scripts) instead of "
                   "the summary line")
    _add_data_options(p, data_help=DATA_HELP + " (default: the data recorded in the adapter)")
    _add_lm_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="generate text with a causal-LM adapter")
    p.add_argument("adapter")
    p.add_argument("--prompt", help="one prompt (sent as a user turn when the adapter learned from chat data)")
    p.add_argument("--prompts", help="JSONL file: one {\"prompt\": ...} or {\"messages\": [...]} per line")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="the longest answer, in tokens "
                   "(default: 64; an answer cut there gets a note)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights first (no adapter "
                   "overhead; a quantized base is quantized again, and the error that added is noted)")
    _add_merge_to(p, "merge into a full-precision model of this dtype (every layer dequantized on a quantized base): "
                  "what `export --to merged` writes (implies --merge)")
    p.add_argument("--model", help="override the base model recorded in the adapter")
    _add_quantize(p, recorded=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="method, counts and bytes of an adapter; VB-LoRA selection plots")
    p.add_argument("adapter")
    p.add_argument("--png", help="where to save the VB-LoRA plot (default: ADAPTER-selection.png)")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a standard PEFT LoRA adapter built from the method's A and B, or "
                       "(--to merged) the base model with a causal-LM adapter merged in")
    p.add_argument("adapter")
    p.add_argument("--to", choices=("peft-lora", "merged"), default="peft-lora",
                   help="peft-lora (default), or merged: a plain transformers model folder, full precision")
    p.add_argument("out")
    _add_merge_to(p, "--to merged: the dtype of the written model (default: float32)")
    _add_quantize(p, recorded=True)
    p.add_argument("--rank", type=_positive_int, help="pad A and B with zeros to this rank (default: the trained rank; "
                   "vLLM serves any rank up to its --max-lora-rank)")
    p.add_argument("--model", help="LoRA-XS and TinyLoRA: the base model (name or path) whose weights' SVD they are "
                   "built on (default: the one the adapter records)")
    p.add_argument("--base-name", metavar="NAME", help="the base_model_name_or_path the export records (default: the "
                   "weights the adapter was trained on; for the embedded SmolLM2, its dequantized local copy)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in OUT (only files unilora wrote)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="our Uni-LoRA / VeRA / VB-LoRA / TinyLoRA adapter as PEFT's own UNILORA / VERA "
                       "/ VBLORA / TINYLORA directory, or a PEFT one as ours (exact both ways)")
    p.add_argument("source", help="a unilora adapter, or a PEFT VBLORA, UNILORA (save_indices=True), VERA "
                   "(save_projection=True, with --model) or TINYLORA (with --model) directory")
    p.add_argument("out")
    p.add_argument("--model", help="the base model (name or path): a PEFT VeRA or TinyLoRA source's layers, or the "
                   "weights our TinyLoRA adapter is built on (default: the one it records)")
    p.add_argument("--no-save-projection", dest="save_projection", action="store_false",
                   help="to PEFT TINYLORA: leave P out of the file (PEFT redraws it from projection_seed)")
    p.add_argument("--base-name", metavar="NAME", help="ours to PEFT: the base_model_name_or_path PEFT's config records "
                   "(default: the weights the adapter was trained on)")
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

    p = sub.add_parser("serve", help="an OpenAI-compatible server for every adapter in a folder, on one base model")
    p.add_argument("--adapters", required=True, metavar="STORE", help="folder of adapter folders (name = folder name)")
    p.add_argument("--model", default=None, help="base model: a local folder or hub name (default: the embedded "
                   "SmolLM2; MiniLM with --task seq-cls)")
    p.add_argument("--task", choices=TASK_KINDS, default="causal-lm", help="causal-lm: completions and chat; "
                   "seq-cls: classifier adapters through POST /v1/classify")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (also read from UNILORA_API_KEY)")
    p.add_argument("--served-model-name", help="the base model's id in /v1/models (default: --model)")
    p.add_argument("--max-resident", type=_positive_int, default=1000, help="adapters attached at once (LRU beyond)")
    p.add_argument("--max-resident-mb", type=_positive_float, default=1024.0,
                   help="MB the resident adapters' tensors may hold (LRU beyond)")
    p.add_argument("--factor-cache-mb", type=_positive_float, default=256.0,
                   help="MB of rebuilt factors kept for recently used adapters")
    p.add_argument("--max-batch", type=_positive_int, default=32, help="sequences decoding together")
    p.add_argument("--max-iteration-tokens", type=_positive_int, default=128,
                   help="tokens of forward work per step: every decoding row, then prompts; longer prompts "
                   "are read in chunks over several steps, so they never stall the running streams")
    p.add_argument("--max-queue", type=_positive_int, default=256, help="requests waiting for a slot (503 beyond)")
    p.add_argument("--max-new-tokens-limit", type=_positive_int, default=1024, help="largest max_tokens allowed")
    p.add_argument("--max-body-kb", type=_positive_int, default=1024, help="largest request body")
    p.add_argument("--request-timeout", type=_positive_float, default=120.0, help="seconds a request may take")
    p.add_argument("--drain-timeout", type=_positive_float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight")
    p.add_argument("--allow-runtime-loading", metavar="ROOT", help="enable /v1/load_lora_adapter for folders under ROOT")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="the model's weights")
    _add_quantize(p)
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve application on a local Ray cluster "
                   "(requests for one adapter go to the replicas holding it; the `ray` extra)")
    p.add_argument("--replicas", type=_positive_int, default=1, help="with --ray: replicas of the model")
    p.add_argument("--api-keys", metavar="FILE", help="keys of several tenants: one 'TENANT KEY' pair per line (KEY "
                   "may be sha256:<hex>); each tenant sees only its own files, jobs and fine-tuned models")
    p.add_argument("--jobs-dir", metavar="DIR", help="where the fine-tuning API keeps its files, jobs (SQLite) and "
                   "resume states (default: STORE/.unilora-jobs)")
    p.add_argument("--max-file-mb", type=_positive_int, default=64, help="largest training file an upload may hold")
    p.add_argument("--max-training-jobs", type=_positive_int, default=2,
                   help="fine-tuning jobs training at once inside the server; the others queue")
    p.add_argument("--training-share", type=_unit_interval, default=0.1,
                   help="the share of each step's --max-iteration-tokens that fine-tuning jobs get while requests "
                   "run or wait (an idle server gives them all of its steps)")
    p.add_argument("--tenant-max-jobs", type=_positive_int, default=4, help="fine-tuning jobs per tenant not yet ended")
    p.add_argument("--tenant-max-file-mb", type=_positive_int, default=1024, help="MB of uploaded files per tenant")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("methods", help="every method: what trains and what is stored")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="train and evaluate a small adapter in a few CPU minutes (Rotten Tomatoes "
                       "classification, or BBC News headlines with --task causal-lm)")
    p.add_argument("--task", choices=TASK_KINDS, default="seq-cls")
    p.add_argument("--method", choices=method_names(), default="unilora")
    p.add_argument("--train-limit", type=_positive_int, help="training examples (default 3000; causal-lm 96)")
    p.add_argument("--test-limit", type=_positive_int, help="test examples (default 1000; causal-lm 24)")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_methods(args) -> int:
    print(methods_epilog().split("\n", 1)[1])
    return 0


def unknown_options(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> str:
    """The one line for arguments no option takes: the closest option of the command, and its --help."""
    chosen = parser.commands.get(command) if command else None
    options = [o for action in (chosen or parser)._actions for o in action.option_strings]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            near = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1, cutoff=0.6)
            if near:
                hints.append(f"{extra.split('=', 1)[0]}: did you mean {near[0]}?")
    where = f"unilora {command} --help" if chosen else "unilora --help"
    return (f"error: unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else "")
            + f" (see '{where}')")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as exit_:  # --help, or an argument error already printed in one line
        return int(exit_.code or 0)
    if extras:
        print(unknown_options(parser, getattr(args, "command", None), extras), file=sys.stderr)
        return 2
    try:
        with render():  # the library's notes as `note: ...` lines
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
