"""`unilora export --to merged`: the base model with the adapter merged into its weights, in full
precision, as a plain transformers model folder (config, weights, tokenizer) that loads anywhere
with no unilora and no adapter overhead.

On a quantized base, every quantized layer is dequantized (the adapted ones merged first), so the
folder holds the weights the adapter was trained beside, plus its update. The folder says it was
written by us in `unilora_merged.json`, which lists its files: `--overwrite` replaces only those.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..core.finite import check_finite
from ..store.io import file_sha256
from ..store.writing import write_output_dir

MARKER = "unilora_merged.json"
# the entries a transformers model and tokenizer may write (a writer producing others is a bug of ours)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _marker_lists(path: Path) -> bool:
    """Whether the folder's marker, written by us, lists this entry."""
    try:
        marker = json.loads((path.parent / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == "unilora-merged" and path.name in marker.get("files", [])


MERGED_FILES = {name: _marker_lists for name in MODEL_FILES + TOKENIZER_FILES}
MERGED_FILES[MARKER] = lambda p: _marker_lists(p.with_name(MODEL_FILES[-1]))


def write_merged_model(model: nn.Module, tokenizer, out_dir, source: dict, overwrite: bool = False) -> list[str]:
    """Write `model` (a plain transformers model, e.g. merge_and_unload's) and `tokenizer` to `out_dir`
    as every output of ours is written (store/writing.py); `source` goes into the marker."""
    check_finite(dict(model.state_dict()), "refusing to write the merged model", "its weights hold non-finite values")

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size="10000GB")  # one weights file
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = sorted(p.name for p in staging.iterdir())
        marker = {"format": "unilora-merged", **source, "files": files,
                  "sha256": {"model.safetensors": file_sha256(staging / "model.safetensors")}}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    write_output_dir(out_dir, write, MERGED_FILES, overwrite, what="merged model", last=(MARKER,))
    params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    return [f"wrote merged model {out_dir}: {params:,} parameters in {str(dtype).removeprefix('torch.')} "
            f"(adapter '{source['adapter']}' merged into {source['base_model']}"
            + (f", dequantized from {source['quantize']}" if source.get("quantize") else "")
            + "); load it with transformers' from_pretrained, no adapter needed"]
