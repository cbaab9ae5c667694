"""FSDP2 sharding for adapted models.

The projection (θ_d, the VB-LoRA bank, ...) is owned by exactly one module, the AdaptedModel
root, so the wrap is simple: shard every transformer block on its own, then the root, which
takes the projection. Each block then holds only its frozen base weights; the shared vector is
gathered once per forward by the root and its gradient reduce-scattered once per backward.
(Libraries that register the shared vector inside every adapted layer cannot be sharded per
block: the same parameter would belong to many FSDP units.)
"""

from __future__ import annotations

from torch import nn

from ..core.errors import UniLoraError
from ..core.targeting import is_quantized
from .model import AdaptedModel


def transformer_blocks(model: AdaptedModel, block_classes: tuple[type, ...] | None = None) -> list[nn.Module]:
    """The blocks to shard: instances of `block_classes`, or of the classes the transformers model
    names in `_no_split_modules` (e.g. LlamaDecoderLayer, BertLayer)."""
    if block_classes is None:
        names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
        if not names:
            raise UniLoraError("cannot tell the transformer blocks of this model: pass block_classes")
        return [m for m in model.get_base_model().modules() if type(m).__name__ in names]
    return [m for m in model.get_base_model().modules() if isinstance(m, block_classes)]


def fully_shard_adapted(model: AdaptedModel, block_classes: tuple[type, ...] | None = None, **fsdp_kwargs) -> AdaptedModel:
    """Apply torch.distributed.fsdp.fully_shard per block, then to the root (owner of the projection)."""
    # deferred: torch.distributed is missing from some torch builds, and FSDP loads DTensor (about a second)
    from torch.distributed.fsdp import fully_shard

    if not isinstance(model, AdaptedModel):
        raise UniLoraError("fully_shard_adapted expects the model returned by unilora.get_model")
    quantized = next(((n, p) for n, p in model.get_base_model().named_parameters() if is_quantized(p)), None)
    if quantized is not None:
        # seen with torchao 0.18: sharding splits every parameter, and Int8Tensor has no aten.split
        name, weight = quantized
        raise UniLoraError(f"FSDP2 cannot shard a quantized base ('{name}' is {type(weight).__name__}); train on a "
                           "quantized base in one process, or shard the unquantized model")
    blocks = transformer_blocks(model, block_classes)
    if not blocks:
        raise UniLoraError("no transformer block found to shard; pass block_classes")
    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model
