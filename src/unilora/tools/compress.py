"""`unilora compress`: fit a Uni-LoRA (or any method's) adapter to an existing low-rank update.

Sources: a PEFT LoRA adapter (ΔW_l = s · B_l A_l), or a base and a fully fine-tuned checkpoint
(ΔW_l = W_ft − W_base, truncated to rank r by SVD, as in PHLoRA).

1. Balance: rewrite each ΔW_l = B'A' with equal singular values in A' and B' (a QR of each factor
   and an r × r SVD), so neither side dominates θ_D.
2. Closed form (Uni-LoRA): θ_d = Pᵀ θ_D, the least-squares fit, because P is isometric (PᵀP = I).
3. Optional refinement: Adam on Σ_l ||B(θ)A(θ) − ΔW_l||², evaluated through r × r Gram matrices
   (ΔW is never formed). This works for every method, e.g. a VB-LoRA bank and logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.finite import check_finite
from ..core.layout import Layout, Slot
from ..core.targeting import name_matches
from ..methods import build_projection, recipe_config, refuse_without_weights
from ..store.adapter_file import adapter_metadata
from ..store.io import ADAPTER_FILES, write_adapter_dir
from ..store.validation import Fields, check_header, read_json_object, tensor_header
from ..store.writing import check_writable

_PEFT_PREFIX = "base_model.model."
# above this relative error of ΔW a weight-space fit keeps too little to be worth using
ERROR_WARNING = 0.5
TARGETS_OF_A_LORA = ("--targets chooses the layers of a full fine-tune (--finetuned-model, or checkpoints); the "
                     "compact adapter of a LoRA teacher adapts the layers that LoRA adapted: drop --targets")


@dataclass
class LowRankUpdate:
    """ΔW = B A for one layer (B: out × r, A: r × in), scaling already folded in."""

    name: str
    a: torch.Tensor
    b: torch.Tensor


def _read_peft_lora_config(directory: Path) -> dict:
    path = directory / "adapter_config.json"
    fields = Fields(read_json_object(path, "a PEFT adapter config"), f"'{path}'")
    if fields.data.get("peft_type") != "LORA":
        raise UniLoraError(f"'{directory}' is a PEFT {fields.data.get('peft_type')} adapter; only LORA can be compressed")
    if fields.boolean("use_dora", default=False):
        raise UniLoraError("DoRA adapters carry a magnitude vector that a LoRA-shaped projection cannot express")
    r = fields.integer("r", 1, 1 << 16)
    return {"r": r, "lora_alpha": fields.number("lora_alpha", default=float(r)),
            "use_rslora": fields.boolean("use_rslora", default=False),
            "fan_in_fan_out": fields.boolean("fan_in_fan_out", default=False)}


def peft_fan_in_fan_out(directory) -> bool:
    return _read_peft_lora_config(Path(directory))["fan_in_fan_out"]


def from_peft_lora(directory: str | Path) -> list[LowRankUpdate]:
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise UniLoraError(f"'{directory}' is not a PEFT LoRA adapter (adapter_config.json and adapter_model.safetensors expected)")
    config = _read_peft_lora_config(directory)
    r = config["r"]
    scaling = config["lora_alpha"] / (r ** 0.5 if config["use_rslora"] else r)
    header = tensor_header(weights_path)
    pairs = {}
    for key, (dtype, shape) in header.items():
        if key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"):
            name, kind = key[: -len(".lora_A.weight")], key[-len("A.weight")]
            pairs.setdefault(name, {})[kind] = (dtype, shape)
    expected = {}
    for name, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise UniLoraError(f"'{weights_path}': {name} has lora_{next(iter(parts))} but no matching partner")
        (_, a_shape), (_, b_shape) = parts["A"], parts["B"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
            raise UniLoraError(f"'{weights_path}': {name} has lora_A {a_shape} and lora_B {b_shape}, "
                               f"not (r, in) and (out, r) with r={r} from its config")
        expected[name + ".lora_A.weight"] = (a_shape, "float")
        expected[name + ".lora_B.weight"] = (b_shape, "float")
    if not expected:
        raise UniLoraError(f"'{weights_path}' holds no lora_A / lora_B tensors")
    check_header(weights_path, {k: v for k, v in header.items() if k in expected}, expected)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise UniLoraError(f"cannot read '{weights_path}': {str(err)[:120]}") from None
    tensors = {k: v for k, v in tensors.items() if k in expected}
    check_finite(tensors, f"'{weights_path}'", "the adapter is damaged or came from a diverged run")
    updates = []
    for name in pairs:
        a, b = tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"]
        short = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        updates.append(LowRankUpdate(short, a.float(), b.float() * scaling))
    return updates


def _read_checkpoint(path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise UniLoraError(f"checkpoint '{path}' does not exist (a .safetensors state dict is expected)")
    tensor_header(Path(path))  # a damaged file fails here, with its name
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UniLoraError(f"cannot read '{path}': {str(err)[:120]}") from None
    return tensors


def truncated(name: str, delta: torch.Tensor, rank: int) -> LowRankUpdate:
    """The best rank-r approximation of ΔW (out × in), its singular values split evenly over B and A."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return LowRankUpdate(name, root[:, None] * vh[:rank], u[:, :rank] * root)


def from_checkpoints(base_path, finetuned_path, targets: list[str], rank: int) -> list[LowRankUpdate]:
    """ΔW = W_ft − W_base of every 2-D weight whose module name ends in a target, truncated to rank r."""
    base, tuned = _read_checkpoint(base_path), _read_checkpoint(finetuned_path)
    updates = []
    for key, w in base.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module is None or w.dim() != 2 or not name_matches(module, targets):
            continue
        if key not in tuned or tuned[key].shape != w.shape:
            raise UniLoraError(f"'{finetuned_path}' lacks '{key}' with shape {tuple(w.shape)}; are these the same model?")
        if not w.is_floating_point() or not tuned[key].is_floating_point():
            raise UniLoraError(f"'{key}' is not a floating-point weight in both checkpoints")
        check_finite({key: w}, f"'{base_path}'", "the checkpoint is damaged")
        check_finite({key: tuned[key]}, f"'{finetuned_path}'", "the checkpoint is damaged")
        updates.append(truncated(module, tuned[key].float() - w.float(), rank))
    if not updates:
        raise UniLoraError(f"no 2-D weight in '{base_path}' matches targets {targets}")
    return updates


def balanced(update: LowRankUpdate, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', Bᵀ') of rank `rank` with B'A' = best rank-`rank` approximation of B A, balanced."""
    qb, rb = torch.linalg.qr(update.b)
    qa, ra = torch.linalg.qr(update.a.t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = torch.zeros(rank, update.a.shape[1])
    bt = torch.zeros(rank, update.b.shape[0])
    a[:k] = root[:, None] * (vh[:k] @ qa.t())
    bt[:k] = (qb @ u[:, :k] * root).t()
    return a, bt


def squared_norm(update: LowRankUpdate, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """||B A||² through the r × r Gram matrices of its factors."""
    a, b = update.a.to(dtype), update.b.to(dtype)
    return ((b.t() @ b) * (a @ a.t())).sum()


def delta_error(factors, updates: list[LowRankUpdate], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ ||Bᵀᵀ A − ΔW||² over layers via r × r Gram matrices (differentiable). The three terms
    cancel, so reported errors use float64: in float32 the floor would be ~3e-4 relative."""
    err = torch.zeros((), dtype=dtype)
    for (a, bt), up in zip(factors, updates):
        a, bt = a.to(dtype), bt.to(dtype)
        ours = ((bt @ bt.t()) * (a @ a.t())).sum()
        cross = ((bt @ up.b.to(dtype)) * (a @ up.a.to(dtype).t())).sum()
        err = err + ours - 2 * cross + squared_norm(up, dtype)
    return err


def compress(updates: list[LowRankUpdate], config: AdapterConfig, steps: int = 0, lr: float = 1e-3):
    """Fit `config.method` to the updates. Returns (projection, layout, report)."""
    refuse_without_weights(config.method, "a fit to a low-rank update")
    layout = Layout([Slot(u.name, u.a.shape[1], u.b.shape[0], config.rank) for u in updates])
    projection = build_projection(config, layout)
    projection.fit_to(torch.cat([t.reshape(-1) for u in updates for t in balanced(u, config.rank)]))
    total64 = sum(squared_norm(u, torch.float64) for u in updates)
    total = total64.float()

    def relative_error() -> float:
        with torch.no_grad():
            return float((delta_error(projection.factors(), updates, torch.float64).clamp_min(0) / total64).sqrt())

    report = {"relative_error_closed_form": relative_error()}
    if steps:
        optimizer = torch.optim.Adam([p for p in projection.parameters() if p.requires_grad], lr=lr)
        for _ in range(steps):
            loss = delta_error(projection.factors(), updates) / total
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        report["relative_error_refined"] = relative_error()
    report["relative_error"] = report.get("relative_error_refined", report["relative_error_closed_form"])
    original_params = sum(u.a.numel() + u.b.numel() for u in updates)
    stored = projection.stored_param_count()
    report.update(original_params=original_params, stored_params=stored, size_ratio=stored / original_params)
    return projection.eval(), layout, report


def save_compressed(projection, layout: Layout, config: AdapterConfig, out_dir, source: str,
                    fan_in_fan_out: bool = False, overwrite: bool = False) -> None:
    metadata = adapter_metadata(config, layout, projection, fan_in_fan_out=fan_in_fan_out, compressed_from=source)
    write_adapter_dir(out_dir, metadata, projection.stored_tensors(), overwrite=overwrite)


def weight_space_fit(out, *, peft_lora=None, base_weights=None, finetuned_weights=None, targets=None,
                     method: str = "unilora", fields: dict | None = None, seed: int = 0, steps: int = 0,
                     lr: float = 1e-3, overwrite: bool = False) -> dict:
    """`unilora compress` without a teacher: a `method` adapter fitted to a PEFT LoRA's update, or to
    the truncated SVD of a full fine-tune (`base_weights`, `finetuned_weights`: .safetensors; the
    layers `targets` names, default query and value), saved to `out` (checked first). `fields`:
    AdapterConfig fields over the method's recipe (rank: the LoRA's, or 8). Returns the fit's report,
    with a warning where it keeps little of the update."""
    check_writable(Path(out), ADAPTER_FILES, overwrite, "adapter")
    if targets and peft_lora:
        raise UniLoraError(TARGETS_OF_A_LORA)
    if bool(peft_lora) == bool(base_weights or finetuned_weights):
        raise UniLoraError("give either --peft-lora DIR or both --base-weights and --finetuned-weights")
    fields = dict(fields or {})
    if peft_lora:
        updates = from_peft_lora(peft_lora)
        source, rank = f"peft-lora:{peft_lora}", fields.get("rank") or updates[0].a.shape[0]
        fan_in_fan_out = peft_fan_in_fan_out(peft_lora)
    else:
        if not (base_weights and finetuned_weights):
            raise UniLoraError("--base-weights and --finetuned-weights go together")
        rank = fields.get("rank") or 8
        updates = from_checkpoints(base_weights, finetuned_weights, targets or ["query", "value"], rank)
        source, fan_in_fan_out = f"checkpoints:{base_weights}|{finetuned_weights}", False
    fields["rank"] = rank
    config = recipe_config(method, sorted({u.name for u in updates}), run_seed=seed, tuned_model=False, **fields)
    projection, layout, report = compress(updates, config, steps=steps, lr=lr)
    save_compressed(projection, layout, projection.config, out, source, fan_in_fan_out, overwrite=overwrite)
    report.update(method=projection.config.method, layers=len(updates), rank=rank, steps=steps, warning=None)
    if report["relative_error"] > ERROR_WARNING:
        report["warning"] = (f"relative error {report['relative_error']:.2f} > {ERROR_WARNING}: the compressed adapter "
                             "keeps little of the source's update, so it will behave much like the base model; a larger "
                             "--theta-dim keeps more (d = D is exact), or train a small adapter on the task itself with "
                             "`unilora finetune`")
    return report
