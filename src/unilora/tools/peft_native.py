"""`unilora convert`: PEFT's own adapter formats for the methods PEFT 0.21.2 also has, exact both ways.

Each such method maps itself in its own file (methods/<name>.py: `peft_type`, `peft_state`,
`peft_config`, `from_peft`; the key names in methods/peft_format.py). This module opens and writes
the directories: ours to PEFT (the config's shared fields, the heads, our checks), and PEFT to ours
(the method found by PEFT's `peft_type`, the base model given where PEFT's files do not record
enough: `peft_needs_model` on the method's class).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.notes import note
from ..core.finite import check_finite
from ..core.layout import Layout
from ..core.registry import PROJECTIONS
from ..methods import build_projection
from ..methods.peft_format import PEFT_PREFIX, PeftSource
from ..models.adapter_base import PEFT_TASK_CLASSES, exported_base, model_skeleton
from ..models.backbones import load_weights
from ..store.adapter_file import adapter_metadata
from ..store.io import write_adapter_dir
from .export import base_weights_of, layer_prefix, peft_heads, peft_target_modules, refuse_overlap, write_peft_dir
from .inspection import rebuild_projection


def peft_methods() -> dict[str, type]:
    """PEFT adapter type -> our method's Projection class, for every registered method PEFT also has."""
    return {cls.peft_type: cls for cls in PROJECTIONS.values() if cls.peft_type}


def to_peft(adapter_dir, out_dir, overwrite: bool = False, model=None, save_projection: bool = True,
            base_name: str | None = None) -> list[str]:
    """Write our adapter as PEFT's own directory of the same method. A method built from the base
    weights (TinyLoRA) gets them from `model` (a module, or a name or path; default the recorded one);
    `save_projection=False` leaves out what PEFT can redraw from the seed (TinyLoRA's P); `base_name`
    is the recorded `base_model_name_or_path` (default: the weights it was trained on)."""
    refuse_overlap(Path(adapter_dir), Path(out_dir))
    meta, tensors, projection = rebuild_projection(adapter_dir, lambda meta, layout: base_weights_of(meta, layout, model))
    method, cls = projection.config.method, type(projection)
    if cls.peft_type is None:
        raise UniLoraError(f"PEFT 0.21.2 has no {method} adapter type; `unilora export` writes any adapter as PEFT LoRA")
    if model is not None and not projection.needs_base_weights:
        raise UniLoraError(f"a model goes with a PEFT {' or '.join(k for k, c in peft_methods().items() if c.peft_needs_model)} "
                           f"source, or our adapter of a method built from the base weights; this {method} adapter "
                           "records its own layout and needs no base weights")
    if not save_projection and not cls.peft_projection_optional:
        raise UniLoraError(f"--no-save-projection is for adapters whose fixed parts PEFT redraws from the seed "
                           f"(TinyLoRA's P); this {method} adapter stores what PEFT needs as is")
    prefix = layer_prefix(meta)
    names = [s.name[len(prefix):] if prefix and s.name.startswith(prefix) else s.name for s in projection.layout.slots]
    with torch.no_grad():
        state = projection.peft_state(names, save_projection)
    task_type, in_file, modules_to_save, head = peft_heads(meta, tensors)
    state.update(in_file)
    recorded, said = exported_base(meta, base_name)
    if said:
        note(said)
    config = {
        "peft_type": cls.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": recorded,
        "r": projection.config.rank,
        "target_modules": peft_target_modules(projection.config, names),
        "fan_in_fan_out": bool(meta.get("fan_in_fan_out", False)),
        "bias": "none",
        "modules_to_save": modules_to_save,
        "inference_mode": True,
        **projection.peft_config(save_projection),
    }
    check_finite({k: v for k, v in {**state, **head}.items() if v.is_floating_point()}, "refusing to convert",
                 "the adapter holds non-finite values")
    write_peft_dir(out_dir, state, config, head, overwrite, what="PEFT adapter")
    report = [f"wrote PEFT {config['peft_type']} adapter {out_dir}: {len(projection.layout)} layers, r={config['r']}, "
              f"task_type={task_type}"]
    if head:
        report.append(f"the trained head ({', '.join(sorted(head))}) is in {Path(out_dir) / 'head.safetensors'}: "
                      "load it into your model separately")
    return report


# --- PEFT to ours ---------------------------------------------------------------------------
def is_peft_dir(directory) -> bool:
    path = Path(directory) / "adapter_config.json"
    try:
        return path.is_file() and isinstance(json.loads(path.read_text()).get("peft_type"), str)
    except (OSError, ValueError):
        return False


def _read_peft_config(peft_dir: Path) -> dict:
    try:
        config = json.loads((peft_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise UniLoraError(f"'{peft_dir}/adapter_config.json' cannot be read as JSON: {err}") from None
    if not isinstance(config, dict):
        raise UniLoraError(f"'{peft_dir}/adapter_config.json' is not a JSON object")
    return config


def _base_model(model, cls: type, task_type: str | None):
    """The base model a method's conversion needs: with its weights, or only its shapes."""
    if not isinstance(model, (str, Path)) or cls.peft_needs_model is None:
        return model
    if cls.peft_needs_model == "weights":
        return load_weights(str(model), getattr(transformers, PEFT_TASK_CLASSES.get(task_type, "AutoModel")))
    return model_skeleton(str(model), task_type)


def from_peft(peft_dir, out_dir, overwrite: bool = False, model=None) -> list[str]:
    """Write PEFT's directory of a method we also have as our adapter, exactly. Where PEFT's files do
    not record enough (VeRA's input sizes and layer order; TinyLoRA's factors, checked against the
    weights), the base model is needed: `model`, a module or a name or path."""
    peft_dir = Path(peft_dir)
    refuse_overlap(peft_dir, Path(out_dir))
    peft_config = _read_peft_config(peft_dir)
    kind = peft_config.get("peft_type")
    methods = peft_methods()
    if kind not in methods:
        raise UniLoraError(f"'{peft_dir}' is a PEFT {kind} adapter; convert reads and writes PEFT "
                           f"{', '.join(sorted(methods))} directories")
    cls = methods[kind]
    model = _base_model(model, cls, peft_config.get("task_type"))
    weights = peft_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UniLoraError(f"'{peft_dir}' lacks adapter_model.safetensors (only safetensors adapters are read)")
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
        reading = cls.from_peft(PeftSource(peft_dir, peft_config, handle, shapes, model))
        tensors = reading.tensors
        head_keys = [key for key in keys if key.startswith(PEFT_PREFIX) and f".{kind.lower()}_" not in key]
        tensors.update({"head." + key[len(PEFT_PREFIX):].replace(".modules_to_save.default.", "."): handle.get_tensor(key)
                        for key in head_keys})
    modules_to_save = list(peft_config.get("modules_to_save") or [])
    config = AdapterConfig(**reading.options, target_modules=[s.name for s in reading.slots],
                           modules_to_save=modules_to_save)
    layout = Layout(reading.slots)
    check_finite({k: v for k, v in tensors.items() if v.is_floating_point()}, "refusing to convert",
                 "the PEFT adapter holds non-finite values")
    projection = build_projection(config, layout)
    if reading.factors is not None:  # an SVD method: the base model's factors, whose fingerprint the adapter records
        projection.attach_factors(reading.factors)
    projection.check_stored_values(tensors, config)
    projection.load_stored_tensors(tensors)
    heads = sorted({key[len("head."):].rsplit(".", 1)[0] for key in tensors if key.startswith("head.")})
    meta = adapter_metadata(config, layout, projection, head_modules=modules_to_save if heads else [],
                            fan_in_fan_out=bool(peft_config.get("fan_in_fan_out", False)),
                            base_model={"class": None, "name_or_path": peft_config.get("base_model_name_or_path")},
                            peft_task_type=peft_config.get("task_type"))
    write_adapter_dir(out_dir, meta, tensors, overwrite=overwrite)
    return [f"wrote unilora {config.method} adapter {out_dir} from PEFT {kind}: {len(reading.slots)} layers, "
            f"r={config.rank}" + (f", heads {heads}" if heads else "")]
