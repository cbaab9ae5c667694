"""`unilora export --to peft-lora`: a standard PEFT LoRA directory built exactly from the method's
A and B (VeRA's and Tied-LoRA's scaling vectors folded in; no SVD, no approximation).

The trained rank is kept: vLLM serves any rank up to its --max-lora-rank (it copies A and B into
the first r rows of its buffers), so padding would only make the file larger. `--rank R` pads A
with zero rows and B with zero columns (ΔW unchanged) for servers that want fixed ranks. vLLM
rejects modules_to_save in a LoRA file, so a trained head goes to head.safetensors beside it.
The config names the task type (so PeftModel.from_pretrained builds the right class) and the
base model's real name or path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..core.errors import UniLoraError
from ..core.notes import note
from ..core.finite import check_finite
from ..core.layout import Layout
from ..core.targeting import base_weights
from ..engine.injection import check_targets_exist
from ..models.adapter_base import base_model_of, exported_base, is_finetuned_classifier, peft_task_type
from ..store.io import save_tensors, written_by_us
from ..store.writing import write_output_dir
from .inspection import rebuild_projection

# a PEFT LoRA folder we exported: its safetensors files say so in their header
EXPORT_FILES = {
    "adapter_config.json": lambda p: written_by_us(p.with_name("adapter_model.safetensors")),
    "adapter_model.safetensors": written_by_us,
    "head.safetensors": written_by_us,
}

def _export_rank(rank: int, requested: int | None) -> int:
    if requested is None:
        return rank
    if requested < rank:
        raise UniLoraError(f"--rank {requested} is below the adapter's rank {rank}; padding can only grow it")
    return requested


_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def base_weights_of(meta: dict, layout, model=None) -> list[torch.Tensor]:
    """The adapted layers' frozen weights in the adapter's base model (what the SVD methods are built from)."""
    base = base_model_of(meta, model)
    prefix = layer_prefix(meta)
    names = [slot.name[len(prefix):] if prefix and slot.name.startswith(prefix) else slot.name for slot in layout.slots]
    check_targets_exist(base, Layout([dataclasses.replace(slot, name=name) for slot, name in zip(layout.slots, names)]))
    return base_weights(base, names)


def peft_target_modules(config, names: list[str]) -> list[str]:
    """The adapter's own name suffixes (PEFT matches them the same way), else the full names."""
    if isinstance(config.target_modules, (list, tuple)):
        return sorted(config.target_modules)
    return sorted(names)


def peft_lora_tensors(projection, rank: int | None = None, strip_prefix: str = ""):
    """PEFT LoRA tensors equal to the projection's A and B, zero-padded to the export rank.
    Returns (tensors, export rank, module names)."""
    r = projection.config.rank
    r_out = _export_rank(r, rank)
    out, names = {}, []
    with torch.no_grad():
        for (a, bt), slot in zip(projection.factors(), projection.layout.slots):
            name = slot.name[len(strip_prefix):] if strip_prefix and slot.name.startswith(strip_prefix) else slot.name
            a_pad = torch.zeros(r_out, slot.in_features)
            a_pad[:r] = a
            b_pad = torch.zeros(slot.out_features, r_out)
            b_pad[:, :r] = bt.t()
            out[f"base_model.model.{name}.lora_A.weight"] = a_pad
            out[f"base_model.model.{name}.lora_B.weight"] = b_pad
            names.append(name)
    return out, r_out, names


def refuse_overlap(source: Path, out: Path) -> None:
    source, out = source.resolve(), out.resolve()
    if out == source or source in out.parents or out in source.parents:
        raise UniLoraError(f"cannot export '{source}' into '{out}': the output would overwrite or nest in the "
                           "source adapter; choose a separate folder")


def peft_heads(meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[str | None, dict, list[str] | None, dict]:
    """(task_type, head tensors for the PEFT file, its modules_to_save, head tensors kept apart).
    PEFT's classification classes load their head from the adapter file (modules_to_save) and
    fail without one; vLLM does not serve such heads, so other task types keep it apart."""
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    task_type = peft_task_type(meta)
    if task_type not in _HEAD_TASKS:
        return task_type, {}, None, head
    if not head:
        return None, {}, None, {}
    return task_type, {f"base_model.model.{k}": v for k, v in head.items()}, list(meta.get("head_modules") or []), {}


def layer_prefix(meta: dict) -> str:
    """Adapters from `unilora finetune` wrap the encoder as `encoder.`: PEFT users load the encoder itself."""
    return "encoder." if is_finetuned_classifier(meta) else ""


def write_peft_dir(out_dir, tensors: dict, config: dict, head: dict, overwrite: bool, what: str) -> None:
    """A PEFT adapter folder (tensors, config, and a head kept apart in head.safetensors), written as
    every output of ours is (writing.py), its config last."""

    def write(staging: Path) -> None:
        save_tensors(tensors, staging / "adapter_model.safetensors")
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if head:
            save_tensors(head, staging / "head.safetensors")

    write_output_dir(out_dir, write, EXPORT_FILES, overwrite, what=what, last=("adapter_config.json",))


def export_peft_lora(adapter_dir, out_dir, rank: int | None = None, overwrite: bool = False,
                     base_model: str | None = None, model=None) -> list[str]:
    """Write `adapter_dir` as a plain PEFT LoRA folder, exact; `base_model` names the base in its
    config (default: the weights the adapter was trained on, models.adapter_base.exported_base). The SVD methods (LoRA-XS, TinyLoRA) rebuild their
    factors from the base model's weights: `model` (as `base_model_of` takes it), else the recorded one."""
    refuse_overlap(Path(adapter_dir), Path(out_dir))
    meta, tensors, projection = rebuild_projection(adapter_dir, lambda meta, layout: base_weights_of(meta, layout, model))
    lora, r_out, names = peft_lora_tensors(projection, rank, layer_prefix(meta))
    task_type, in_file, modules_to_save, head = peft_heads(meta, tensors)
    lora.update(in_file)
    base_name, said = exported_base(meta, base_model)
    if said:
        note(said)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "r": r_out,
        # PEFT scales by lora_alpha / r: keep the adapter's own scaling at the padded rank
        "lora_alpha": projection.config.scaling * r_out,
        "target_modules": peft_target_modules(projection.config, names),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(meta.get("fan_in_fan_out", False)),
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }

    check_finite({**lora, **head}, "refusing to export", "the adapter holds non-finite values")
    write_peft_dir(out_dir, lora, config, head, overwrite, what="PEFT export")
    r = projection.config.rank
    report = [
        f"wrote PEFT LoRA adapter {out_dir}: {len(names)} layers, r={r_out} (trained rank {r}"
        f"{', zero rows/columns added' if r_out != r else ''}), lora_alpha={config['lora_alpha']:g}, "
        f"task_type={config['task_type']}" + (f", head in the file as modules_to_save {modules_to_save}" if modules_to_save else ""),
    ]
    if head:
        report.append(f"the trained head ({', '.join(sorted(head))}) is in {Path(out_dir) / 'head.safetensors'}, "
                      "not in the LoRA file (vLLM rejects modules_to_save): load it into your model separately")
    return report
