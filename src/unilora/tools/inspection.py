"""`unilora inspect`: what an adapter holds, without loading any base model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..core.extras import require
from ..methods import build_projection
from ..store.io import CONFIG_NAME, HEAD_PREFIX, WEIGHTS_NAME, read_adapter


def rebuild_projection(adapter_dir, base_weights=None):
    """The adapter's projection, rebuilt from its (validated) config, layout and tensors. A method
    built from the base model's weights (LoRA-XS, TinyLoRA) gets them from `base_weights(meta, layout)`
    and is checked against them; without it, it is left unattached (it counts, it builds no factors).
    Returns (config dict, all tensors with heads as head.*, projection in eval mode)."""
    adapter = read_adapter(adapter_dir)
    weights = None if base_weights is None else (lambda: base_weights(adapter.meta, adapter.layout))
    projection = build_projection(adapter.config, adapter.layout, weights)
    projection.check_metadata(adapter.meta.get("projection", {}))
    projection.load_stored_tensors(adapter.tensors)
    tensors = {**adapter.tensors, **{HEAD_PREFIX + k: v for k, v in adapter.head.items()}}
    return adapter.meta, tensors, projection.eval()


def describe(adapter_dir) -> dict:
    meta, tensors, projection = rebuild_projection(adapter_dir)
    config = meta["adapter"]
    head = {k: v for k, v in tensors.items() if k.startswith("head.")}
    info = {
        "method": config["method"],
        "base_model": meta["base_model"].get("name_or_path") or meta["base_model"].get("class"),
        "adapted_layers": len(meta["layout"]),
        "rank": config["rank"],
        "D (LoRA parameters reconstructed)": meta["D"],
        "trainable_params": sum(p.numel() for p in projection.parameters() if p.requires_grad),
        "stored_params": projection.stored_param_count(),
        "stored_bytes": sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.startswith("head.")),
        "head_params": sum(t.numel() for t in head.values()),
        "file_bytes": sum((Path(adapter_dir) / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME)),
        "tensors": ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in tensors.items()),
    }
    if config["method"] == "vblora":
        indices, _ = projection.topk_selection()
        used = torch.bincount(indices.reshape(-1).long(), minlength=config["num_vectors"])
        info["bank_vectors_used"] = f"{int((used > 0).sum())} of {config['num_vectors']}"
    if config["method"] == "tinylora":
        u, tying = projection.config.u, projection.config.weight_tying
        info["trained vectors"] = f"{projection.v.numel() // u} of u={u} (weight_tying {tying:g}, {len(meta['layout'])} layers)"
    if "task" in meta:
        info["task"] = f"{meta['task'].get('dataset')} ({', '.join(meta['task'].get('label_names', []))})"
    return info


def save_selection_plot(adapter_dir, png_path, max_subvectors: int = 96) -> Path:
    """Seed 003 figures 3 and 8: how often each bank vector is selected, and which vectors the
    first sub-vectors select (the selection footprint)."""
    require("plots", "the VB-LoRA selection plot", hint=", or pass --no-plot")
    import matplotlib  # deferred: the optional `plots` extra, needed for VB-LoRA's plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, _, projection = rebuild_projection(adapter_dir)
    h = meta["adapter"]["num_vectors"]
    indices, weights = projection.topk_selection()
    usage = torch.bincount(indices.reshape(-1).long(), minlength=h)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.bar(range(h), usage.numpy(), width=1.0, color="tab:blue")
    left.set(title=f"vector usage ({indices.shape[0]} sub-vectors, top-{indices.shape[1]})",
             xlabel="bank vector index", ylabel="times selected")
    n = min(max_subvectors, indices.shape[0])
    xs = torch.arange(n).repeat_interleave(indices.shape[1])
    ys = indices[:n].reshape(-1)
    right.scatter(xs.numpy(), ys.numpy(), c=weights[:n].reshape(-1).numpy(), cmap="Blues", vmin=0, vmax=1,
                  marker="s", s=14, edgecolors="tab:blue", linewidths=0.3)
    right.set(title=f"selection footprint (first {n} sub-vectors; shade = weight)",
              xlabel="sub-vector", ylabel="bank vector index", ylim=(-1, h))
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{png_path.name}.", suffix=".png", dir=png_path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return png_path
