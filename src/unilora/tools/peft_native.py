"""`unilora convert`: PEFT's own adapter formats for the methods PEFT 0.21.2 also has.

Ours to PEFT (Uni-LoRA -> UNILORA, VeRA -> VERA, VB-LoRA -> VBLORA), exact: PEFT regenerates
UniLora's indices and VeRA's matrices from torch's RNG, so the directory stores ours instead
(`save_indices` / `save_projection`), and PEFT's model gives our outputs.

- Uni-LoRA: θ_d as is; each layer's entries of our index vector as PEFT's `indices_A` (r × in)
  and `indices_B` (out × r, i.e. our Bᵀ's transposed), their 1/sqrt(n_j) as `scales_A` /
  `scales_B` (our scaling folded into `scales_B`).
- VeRA: our shared A, Bᵀ as `vera_A` (r × max in) and `vera_B` (max out × r); each layer's d and
  b as `lambda_d` and `lambda_b` (scaling folded into `lambda_b`).
- VB-LoRA: the bank as `vblora_vector_bank`; the logits per layer as `logits_A` (r × in/b × h) and
  `logits_B` (out/b × r × h). An adapter stored as top-k gets logits whose top-k softmax is the
  stored weights (as our own loader rebuilds them). PEFT has no scaling for VB-LoRA: a scaling
  other than 1 is refused.

PEFT to ours, exact: VB-LoRA directories (full logits) become our adapters stored as logits;
UniLora directories saved with `save_indices=True` and VeRA directories saved with
`save_projection=True` become adapters that store those fixed parts (`fixed_parts="stored"`;
Uni-LoRA's scales 1/sqrt(n_j) are recomputed from the indices, as PEFT computes them). PEFT's
VeRA files do not record each layer's input size, so VeRA needs the base model (`--model`; only
its config is read, the modules are built on the meta device). TinyLoRA needs it with its weights:
the SVD factors PEFT stored are checked against the model's own (see `_tinylora_from_peft`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.layout import Layout, Slot
from ..core.targeting import base_module, is_adaptable, linear_shape
from ..engine.injection import base_weights
from ..methods import build_projection
from ..methods.svd import truncated_svd
from ..methods.tinylora import draw_projections, tying_groups
from ..models.backbones import load_weights, local_or_hub
from ..store.adapter_file import adapter_metadata
from ..store.io import write_adapter_dir
from ..store.validation import check_finite
from .export import (
    PEFT_TASK_CLASSES,
    base_model_name,
    base_weights_of,
    layer_prefix,
    peft_heads,
    peft_target_modules,
    refuse_overlap,
    write_peft_dir,
)
from .inspection import rebuild_projection

PEFT_TYPES = {"unilora": "UNILORA", "vera": "VERA", "vblora": "VBLORA", "tinylora": "TINYLORA"}
_PREFIX = "base_model.model."


def _module_tensors(projection, prefix: str, save_projection: bool = True) -> dict[str, torch.Tensor]:
    """PEFT's state-dict entries for the projection's method (module names without `prefix`)."""
    config, layout, s = projection.config, projection.layout, projection.config.scaling
    names = [slot.name[len(prefix):] if prefix and slot.name.startswith(prefix) else slot.name for slot in layout.slots]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if config.method == "unilora":
            out["base_model.unilora_theta_d"] = projection.theta_d.detach().clone()
            scales = projection.slot_scale[projection.indices.long()]
            for name, (idx_a, idx_bt), (sc_a, sc_bt) in zip(names, layout.split(projection.indices.long()),
                                                           layout.split(scales)):
                out[f"{_PREFIX}{name}.unilora_indices_A"] = idx_a.clone()
                out[f"{_PREFIX}{name}.unilora_indices_B"] = idx_bt.t().contiguous()
                out[f"{_PREFIX}{name}.unilora_scales_A"] = sc_a.clone()
                out[f"{_PREFIX}{name}.unilora_scales_B"] = (sc_bt.t() * s).contiguous()
        elif config.method == "vera":
            out["base_model.vera_A"] = projection.shared_a.clone()
            out["base_model.vera_B"] = projection.shared_bt.t().contiguous()
            for name, factors in zip(names, projection.layer_factors()):
                out[f"{_PREFIX}{name}.vera_lambda_d"] = factors.d.detach().clone()
                out[f"{_PREFIX}{name}.vera_lambda_b"] = (factors.b.detach() * s).clone()
        elif config.method == "tinylora":
            for g, v in enumerate(projection.v.detach().view(-1, config.u)):
                out[f"base_model.tinylora_v.{g}"] = v.clone()
            for name, (a, b), p in zip(names, projection.svd_factors(), projection.projections):
                out[f"{_PREFIX}{name}.tinylora_A"] = a.clone()
                out[f"{_PREFIX}{name}.tinylora_B"] = (b * s).contiguous()  # PEFT has no scaling: folded into B
                if save_projection:
                    out[f"{_PREFIX}{name}.tinylora_P"] = p.clone()
        else:
            if s != 1.0:
                raise UniLoraError(f"this VB-LoRA adapter scales its update by {s:g}; PEFT's VB-LoRA has no scaling, "
                                   "so it cannot hold it exactly (export it as LoRA with `unilora export` instead)")
            b, h = config.vector_length, config.num_vectors
            out["base_model.vblora_vector_bank"] = projection.bank.detach().clone()
            offset = 0
            for name, slot in zip(names, layout.slots):
                n_a, n_b = slot.rank * slot.in_features // b, slot.rank * slot.out_features // b
                logits_a = projection.logits[offset: offset + n_a].reshape(slot.rank, slot.in_features // b, h)
                logits_bt = projection.logits[offset + n_a: offset + n_a + n_b].reshape(slot.rank, slot.out_features // b, h)
                out[f"{_PREFIX}{name}.vblora_logits_A"] = logits_a.clone()
                out[f"{_PREFIX}{name}.vblora_logits_B"] = logits_bt.transpose(0, 1).contiguous()
                offset += n_a + n_b
    return out


def _peft_config(meta: dict, projection, task_type, modules_to_save, targets: list[str],
                 save_projection: bool = True) -> dict:
    config = projection.config
    common = {
        "peft_type": PEFT_TYPES[config.method],
        "task_type": task_type,
        "base_model_name_or_path": base_model_name(meta),
        "r": config.rank,
        "target_modules": targets,
        "fan_in_fan_out": bool(meta.get("fan_in_fan_out", False)),
        "bias": "none",
        "modules_to_save": modules_to_save,
        "inference_mode": True,
    }
    if config.method == "unilora":
        return {**common, "theta_d_length": config.theta_dim, "proj_seed": config.seed, "unilora_dropout": 0.0,
                "save_indices": True, "init_weights": True}
    if config.method == "vera":
        return {**common, "projection_prng_key": config.seed, "save_projection": True, "vera_dropout": 0.0,
                "d_initial": config.vera_d_init, "init_weights": True}
    if config.method == "tinylora":
        return {**common, "u": config.u, "weight_tying": config.weight_tying, "projection_seed": config.seed,
                "save_projection": save_projection, "init_weights": True, "tinylora_dropout": 0.0}
    return {**common, "num_vectors": config.num_vectors, "vector_length": config.vector_length, "topk": config.topk,
            "save_only_topk_weights": False, "vblora_dropout": 0.0}


def to_peft(adapter_dir, out_dir, overwrite: bool = False, model=None, save_projection: bool = True) -> list[str]:
    """Write our adapter as PEFT's own directory of the same method. TinyLoRA: its SVD factors come from
    the base model (`model`: a module, or a name or path; default the recorded one), and with
    `save_projection=False` PEFT redraws P from the seed, as ours does (not for P read from PEFT)."""
    refuse_overlap(Path(adapter_dir), Path(out_dir))
    meta, tensors, projection = rebuild_projection(adapter_dir, lambda meta, layout: base_weights_of(meta, layout, model))
    method = projection.config.method
    if method not in PEFT_TYPES:
        raise UniLoraError(f"PEFT 0.21.2 has no {method} adapter type; `unilora export` writes any adapter as PEFT LoRA")
    if model is not None and not projection.needs_base_weights:
        raise UniLoraError(f"a model goes with a PEFT VeRA or TinyLoRA source, or our TinyLoRA adapter; this {method} "
                           "adapter records its own layout and needs no base weights")
    if save_projection is False and method != "tinylora":
        raise UniLoraError("--no-save-projection is for TinyLoRA adapters (P); this one stores what PEFT needs as is")
    if not save_projection and projection.config.fixed_parts == "stored":
        raise UniLoraError("this TinyLoRA adapter stores its P tensors (it came from PEFT with flipped SVD signs or its "
                           "own draw), so PEFT could not redraw them from the seed: convert it with save_projection")
    prefix = layer_prefix(meta)
    state = _module_tensors(projection, prefix, save_projection)
    task_type, in_file, modules_to_save, head = peft_heads(meta, tensors)
    state.update(in_file)
    names = [s.name[len(prefix):] if prefix else s.name for s in projection.layout.slots]
    config = _peft_config(meta, projection, task_type, modules_to_save, peft_target_modules(projection.config, names),
                          save_projection)
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


def _natural(name: str) -> list:
    """Sort key putting layers.2 before layers.10 (model order for numbered blocks)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_peft_config(peft_dir: Path) -> dict:
    try:
        config = json.loads((peft_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise UniLoraError(f"'{peft_dir}/adapter_config.json' cannot be read as JSON: {err}") from None
    if not isinstance(config, dict):
        raise UniLoraError(f"'{peft_dir}/adapter_config.json' is not a JSON object")
    return config


def _integers(peft_dir: Path, config: dict, keys: tuple[str, ...]) -> list[int]:
    values = [config.get(key) for key in keys]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise UniLoraError(f"'{peft_dir}/adapter_config.json' lacks a positive integer {' / '.join(keys)}")
    return values


def _modules(keys: list[str], suffix: str) -> list[str]:
    return sorted({key[len(_PREFIX):-len(suffix)] for key in keys if key.startswith(_PREFIX) and key.endswith(suffix)},
                  key=_natural)


def _vblora_from_peft(peft_dir: Path, peft_config: dict, handle, shapes: dict, weights: Path):
    if peft_config.get("save_only_topk_weights"):
        raise UniLoraError("this PEFT VB-LoRA adapter keeps only top-k weights; save it with save_only_topk_weights=False "
                           "to convert it")
    r, h, b, k = _integers(peft_dir, peft_config, ("r", "num_vectors", "vector_length", "topk"))
    modules = _modules(list(shapes), ".vblora_logits_A")
    if shapes.get("base_model.vblora_vector_bank") != (h, b) or not modules:
        raise UniLoraError(f"'{weights}' does not hold a VB-LoRA bank of shape ({h}, {b}) and per-layer logits")
    slots = []
    for name in modules:
        shape_a, shape_b = shapes.get(f"{_PREFIX}{name}.vblora_logits_A"), shapes.get(f"{_PREFIX}{name}.vblora_logits_B")
        if (shape_a is None or shape_b is None or len(shape_a) != 3 or len(shape_b) != 3 or shape_a[0] != r
                or shape_b[1] != r or shape_a[2] != h or shape_b[2] != h):
            raise UniLoraError(f"'{weights}': the logits of '{name}' have shapes {shape_a}, {shape_b}; expected "
                               f"({r}, in/{b}, {h}) and (out/{b}, {r}, {h})")
        slots.append(Slot(name, shape_a[1] * b, shape_b[0] * b, r))
    config = dict(method="vblora", rank=r, num_vectors=h, vector_length=b, topk=k, store="logits")
    logits = []
    for name in modules:
        logits.append(handle.get_tensor(f"{_PREFIX}{name}.vblora_logits_A").reshape(-1, h))
        logits.append(handle.get_tensor(f"{_PREFIX}{name}.vblora_logits_B").transpose(0, 1).reshape(-1, h))
    tensors = {"vblora.bank": handle.get_tensor("base_model.vblora_vector_bank"), "vblora.logits": torch.cat(logits)}
    return slots, config, tensors, None


def _unilora_from_peft(peft_dir: Path, peft_config: dict, handle, shapes: dict, weights: Path):
    r, d = _integers(peft_dir, peft_config, ("r", "theta_d_length"))
    modules = _modules(list(shapes), ".unilora_indices_A")
    if not modules:
        raise UniLoraError(f"'{weights}' holds no UniLora indices: PEFT saved it without save_indices=True and would "
                           "redraw them from torch's RNG; re-save it with save_indices=True to convert it exactly")
    if shapes.get("base_model.unilora_theta_d") != (d,):
        raise UniLoraError(f"'{weights}' does not hold a theta_d of length {d}")
    slots, indices = [], []
    for name in modules:
        shape_a, shape_b = shapes.get(f"{_PREFIX}{name}.unilora_indices_A"), shapes.get(f"{_PREFIX}{name}.unilora_indices_B")
        if shape_a is None or shape_b is None or len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != r or shape_b[1] != r:
            raise UniLoraError(f"'{weights}': the indices of '{name}' have shapes {shape_a}, {shape_b}; expected "
                               f"({r}, in) and (out, {r})")
        slots.append(Slot(name, shape_a[1], shape_b[0], r))
        indices.append(handle.get_tensor(f"{_PREFIX}{name}.unilora_indices_A").reshape(-1))
        indices.append(handle.get_tensor(f"{_PREFIX}{name}.unilora_indices_B").t().reshape(-1))  # our Bᵀ, row-major
    config = dict(method="unilora", rank=r, theta_dim=d, fixed_parts="stored", seed=int(peft_config.get("proj_seed") or 0))
    flat = torch.cat(indices)
    tensors = {"unilora.theta_d": handle.get_tensor("base_model.unilora_theta_d"),
               "unilora.indices": flat.to(torch.int32 if flat.numel() < 2**31 else torch.int64)}
    return slots, config, tensors, None


def _vera_from_peft(peft_dir: Path, peft_config: dict, handle, shapes: dict, weights: Path, model):
    (r,) = _integers(peft_dir, peft_config, ("r",))
    modules = _modules(list(shapes), ".vera_lambda_d")
    shape_a, shape_b = shapes.get("base_model.vera_A"), shapes.get("base_model.vera_B")
    if not modules or shape_a is None or shape_b is None:
        raise UniLoraError(f"'{weights}' holds no VeRA matrices: PEFT saved it without save_projection=True and would "
                           "redraw them from torch's RNG; re-save it with save_projection=True to convert it exactly")
    modules = _model_order(set(modules), model, "VERA")
    slots = []
    for name in modules:
        n_in, n_out = linear_shape(base_module(model, name))
        if (shapes.get(f"{_PREFIX}{name}.vera_lambda_d") != (r,)
                or shapes.get(f"{_PREFIX}{name}.vera_lambda_b") != (n_out,)):
            raise UniLoraError(f"'{weights}': the vectors of '{name}' do not fit r={r} and the model's {n_out} outputs; "
                               "give the model the adapter was trained on")
        slots.append(Slot(name, n_in, n_out, r))
    expected = ((r, max(s.in_features for s in slots)), (max(s.out_features for s in slots), r))
    if (shape_a, shape_b) != expected:
        raise UniLoraError(f"'{weights}': vera_A / vera_B have shapes {shape_a}, {shape_b}; these layers need {expected}")
    scales = [handle.get_tensor(f"{_PREFIX}{name}.vera_lambda_{part}") for name in modules for part in ("d", "b")]
    config = dict(method="vera", rank=r, fixed_parts="stored", seed=int(peft_config.get("projection_prng_key") or 0),
                  vera_d_init=float(peft_config.get("d_initial", 0.1)))
    tensors = {"vera.scales": torch.cat(scales), "vera.shared_a": handle.get_tensor("base_model.vera_A"),
               "vera.shared_bt": handle.get_tensor("base_model.vera_B").t().contiguous()}
    return slots, config, tensors, None


def _tinylora_from_peft(peft_dir: Path, peft_config: dict, handle, shapes: dict, weights: Path, model):
    """PEFT's TinyLoRA as ours. Its tinylora_A = √σ V_rᵀ and tinylora_B = U_r √σ are checked against
    the SVD of the base model's weights (`model`, with weights), which is what our adapter rebuilds at
    load and records the fingerprint of: PEFT rounds the factors to the base model's dtype, so a
    bfloat16 model's factors could never match our float32 SVD's fingerprint themselves. Pairs whose
    signs differ from ours flip P's rows and columns (D P D), so ΔW is unchanged."""
    r, u = _integers(peft_dir, peft_config, ("r", "u"))
    tying, seed = peft_config.get("weight_tying", 0.0), peft_config.get("projection_seed", 42)
    if not (isinstance(tying, (int, float)) and not isinstance(tying, bool) and 0 <= tying <= 1):
        raise UniLoraError(f"'{peft_dir}/adapter_config.json': weight_tying must be a number in [0, 1], got {tying!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63 - 2**31):
        raise UniLoraError(f"'{peft_dir}/adapter_config.json': projection_seed must be a non-negative integer, got {seed!r}")
    modules = set(_modules(list(shapes), ".tinylora_A"))
    if not modules:
        raise UniLoraError(f"'{weights}' holds no TinyLoRA factors (tinylora_A / tinylora_B)")
    order = _model_order(modules, model, "TINYLORA")  # PEFT numbers the layers in model order (P's seeds, v's groups)
    groups = tying_groups(len(order), float(tying))
    v_keys = [f"base_model.tinylora_v.{g}" for g in range(max(groups) + 1)]
    if any(shapes.get(key) != (u,) for key in v_keys) or len([k for k in shapes if ".tinylora_v." in k]) != len(v_keys):
        raise UniLoraError(f"'{weights}' does not hold {len(v_keys)} TinyLoRA vectors of length {u} (one per group of "
                           f"{len(order)} layers at weight_tying={tying})")
    layer_keys = [{part: f"{_PREFIX}{name}.tinylora_{part}" for part in ("A", "B", "P")} for name in order]
    slots = []
    for name, keys in zip(order, layer_keys):  # every shape checked before the SVD is taken
        n_in, n_out = linear_shape(base_module(model, name))
        if shapes.get(keys["A"]) != (r, n_in) or shapes.get(keys["B"]) != (n_out, r) or \
                shapes.get(keys["P"], (u, r, r)) != (u, r, r):
            raise UniLoraError(f"'{weights}': the factors of '{name}' have shapes {shapes.get(keys['A'])}, "
                               f"{shapes.get(keys['B'])}; this model's layer needs ({r}, {n_in}) and ({n_out}, {r})")
        slots.append(Slot(name, n_in, n_out, r))
    factors = truncated_svd(base_weights(model, order), r)  # ours, as the adapter will rebuild them at load
    projections, seeded = [], True
    for index, (name, keys, (left, s, right)) in enumerate(zip(order, layer_keys, factors)):
        a, b = handle.get_tensor(keys["A"]), handle.get_tensor(keys["B"])
        check_finite({keys["A"]: a, keys["B"]: b}, "refusing to convert", "the PEFT adapter holds non-finite values")
        signs = _peft_svd_signs(a, b, left, s, right, name)
        drawn = draw_projections(1, u, r, seed + index)[0]
        p = handle.get_tensor(keys["P"]).float() if keys["P"] in shapes else drawn
        seeded = seeded and bool((signs > 0).all()) and torch.equal(p, drawn)
        projections.append(p * signs.view(1, r, 1) * signs.view(1, 1, r))
    config = dict(method="tinylora", rank=r, u=u, weight_tying=float(tying), seed=seed,
                  fixed_parts="seeded" if seeded else "stored")
    tensors = {"tinylora.v": torch.cat([handle.get_tensor(key) for key in v_keys])}
    if not seeded:
        tensors["tinylora.projections"] = torch.stack(projections)
    return slots, config, tensors, factors


def _peft_svd_signs(a: torch.Tensor, b: torch.Tensor, left: torch.Tensor, s: torch.Tensor, right: torch.Tensor,
                    name: str) -> torch.Tensor:
    """±1 per pair: PEFT's (tinylora_B, tinylora_A) of one layer against our SVD (U_r, σ, V_rᵀ) of the
    base weight, after checking they are the same truncated SVD to the precision PEFT stored them in."""
    a, b = a.float(), b.float()
    half = any(all(torch.equal(t, t.to(low).float()) for t in (a, b)) for low in (torch.bfloat16, torch.float16))
    ours = (left * s) @ right
    gap = float(torch.linalg.matrix_norm(b @ a - ours) / torch.linalg.matrix_norm(ours).clamp_min(1e-30))
    tolerance = 2e-2 if half else 1e-4  # a half-precision model's factors (PEFT rounds them): bfloat16 keeps 8 bits
    if not gap <= tolerance:
        raise UniLoraError(f"the PEFT adapter's SVD factors of '{name}' differ from the given model's (relative "
                           f"difference {gap:.2g} of the rank-{s.numel()} part): give the base model it was trained on")
    agreement = (b * left).sum(dim=0) / (b.norm(dim=0) * left.norm(dim=0)).clamp_min(1e-30)
    if not bool((agreement.abs() > 0.5).all()):
        raise UniLoraError(f"the PEFT adapter's singular vectors of '{name}' are not the given model's, though they span "
                           "the same space (near-equal singular values); this adapter cannot be converted exactly")
    return torch.sign(agreement)


def _model_order(modules: set[str], model, kind: str) -> list[str]:
    """The adapted modules in the model's order, each checked to be a linear layer there."""
    if model is None:
        raise UniLoraError(f"PEFT {kind} files do not record their layers' order and input sizes: give the base model "
                           "it was trained on (unilora convert ... --model NAME_OR_PATH)")
    order = [name for name, _ in model.named_modules() if name in modules]
    missing = sorted(modules - set(order))
    if missing:
        raise UniLoraError(f"the PEFT adapter adapts '{missing[0]}', which the given model lacks; give the model it was "
                           "trained on")
    for name in order:
        if not is_adaptable(base_module(model, name)):
            raise UniLoraError(f"the PEFT adapter adapts '{name}', which is not a linear layer in the given model")
    return order


def model_skeleton(name_or_path: str, task_type: str | None) -> torch.nn.Module:
    """The model's modules and shapes, without weights (built on the meta device from its config)."""
    try:
        config = transformers.AutoConfig.from_pretrained(local_or_hub(name_or_path))
    except (OSError, ValueError) as err:
        raise UniLoraError(f"--model '{name_or_path}': no model config found there ({str(err).splitlines()[0]})") from None
    with torch.device("meta"):
        return getattr(transformers, PEFT_TASK_CLASSES.get(task_type, "AutoModel")).from_config(config)


_FROM_PEFT = {"VBLORA": _vblora_from_peft, "UNILORA": _unilora_from_peft, "VERA": _vera_from_peft,
              "TINYLORA": _tinylora_from_peft}
_NEEDS_MODEL = ("VERA", "TINYLORA")


def from_peft(peft_dir, out_dir, overwrite: bool = False, model=None) -> list[str]:
    """Write PEFT's VB-LoRA, UniLora, VeRA or TinyLoRA directory as our adapter, exactly (VB-LoRA's logits,
    UniLora's stored indices and VeRA's stored matrices are kept). VeRA and TinyLoRA need the base model
    (`model`: a module or a name or path): its layers give the input sizes and order PEFT does not
    record, and TinyLoRA's factors are checked against its weights."""
    peft_dir = Path(peft_dir)
    refuse_overlap(peft_dir, Path(out_dir))
    peft_config = _read_peft_config(peft_dir)
    kind = peft_config.get("peft_type")
    if isinstance(model, (str, Path)):  # TinyLoRA's factors are checked against the weights' SVD; VeRA needs shapes only
        model = (load_weights(str(model), getattr(transformers, PEFT_TASK_CLASSES.get(peft_config.get("task_type"), "AutoModel")))
                 if kind == "TINYLORA" else model_skeleton(str(model), peft_config.get("task_type")))
    if kind not in _FROM_PEFT:
        raise UniLoraError(f"'{peft_dir}' is a PEFT {kind} adapter; convert reads and writes PEFT UNILORA, VERA, "
                           "VBLORA and TINYLORA directories")
    weights = peft_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UniLoraError(f"'{peft_dir}' lacks adapter_model.safetensors (only safetensors adapters are read)")
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
        read = _FROM_PEFT[kind]
        extra = (model,) if kind in _NEEDS_MODEL else ()
        slots, options, tensors, factors = read(peft_dir, peft_config, handle, shapes, weights, *extra)
        head_keys = [key for key in keys if key.startswith(_PREFIX) and f".{kind.lower()}_" not in key]
        tensors.update({"head." + key[len(_PREFIX):].replace(".modules_to_save.default.", "."): handle.get_tensor(key)
                        for key in head_keys})
    modules_to_save = list(peft_config.get("modules_to_save") or [])
    config = AdapterConfig(**options, target_modules=[s.name for s in slots], modules_to_save=modules_to_save)
    layout = Layout(slots)
    check_finite({k: v for k, v in tensors.items() if v.is_floating_point()}, "refusing to convert",
                 "the PEFT adapter holds non-finite values")
    projection = build_projection(config, layout)
    if factors is not None:  # an SVD method: the base model's factors, whose fingerprint the adapter records
        projection.attach_factors(factors)
    projection.check_stored_values(tensors, config)
    projection.load_stored_tensors(tensors)
    heads = sorted({key[len("head."):].rsplit(".", 1)[0] for key in tensors if key.startswith("head.")})
    meta = adapter_metadata(config, layout, projection, head_modules=modules_to_save if heads else [],
                            fan_in_fan_out=bool(peft_config.get("fan_in_fan_out", False)),
                            base_model={"class": None, "name_or_path": peft_config.get("base_model_name_or_path")},
                            peft_task_type=peft_config.get("task_type"))
    write_adapter_dir(out_dir, meta, tensors, overwrite=overwrite)
    return [f"wrote unilora {config.method} adapter {out_dir} from PEFT {kind}: {len(slots)} layers, r={config.rank}"
            + (f", heads {heads}" if heads else "")]
