"""The optional extras of pyproject's [project.optional-dependencies]: the code behind each imports its
packages only where it is used, and asks `require` first, so that a missing one is one line naming the
pip command instead of an ImportError from deep inside."""

from __future__ import annotations

import importlib.util

from .errors import UniLoraError

# the modules each extra brings that our code imports (pyproject lists the distributions)
EXTRAS = {
    "serve": ("fastapi", "uvicorn", "prometheus_client", "python_multipart"),
    "ray": ("ray",),
    "datasets": ("datasets",),
    "plots": ("matplotlib",),
    "llm": ("gguf", "rouge_score"),
    "quant": ("torchao", "bitsandbytes"),
}


def missing_modules(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    return [name for name in (modules or EXTRAS[extra]) if importlib.util.find_spec(name) is None]


def require(extra: str, what: str, modules: tuple[str, ...] | None = None, hint: str = "") -> None:
    """Refuse in one line when `what` needs packages of `extra` that are not installed (all of the
    extra's modules, or only the given ones)."""
    missing = missing_modules(extra, modules)
    if missing:
        raise UniLoraError(f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                           f'pip install "unilora[{extra}]"{hint}')
