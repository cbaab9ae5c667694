"""The house's rules, checked on its source (docs/design.md, "The map of the house"): the layers
contract (run by CI as `lint-imports`) fails on an upward import or a cycle, no module imports
another's private names, no class outgrows one sitting, imports sit at the top of modules but for
the deferrals named below, and the command line holds no tensor code."""

import ast
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "unilora"
MODULES = sorted(PACKAGE.rglob("*.py"))

# imports inside functions, each deferred for a reason its comment gives
DEFERRED = {
    ("_console.py", ".cli.main"): "torch and transformers, loaded after the command's SIGTERM handling is set",
    ("engine/distributed.py", "torch.distributed.fsdp"): "missing from some torch builds; loads DTensor",
    ("tools/inspection.py", "matplotlib"): "the optional plots extra",
    ("tools/inspection.py", "matplotlib.pyplot"): "the optional plots extra",
    ("training/causal_lm.py", "rouge_score"): "the optional llm extra",
    ("cli/commands.py", "..serve.server"): "fastapi and uvicorn: the optional serve extra",
    ("cli/commands.py", "..deploy.ray_app"): "ray: the optional ray extra",
    ("serve/__init__.py", ".app"): "fastapi: the CLI reads serve.settings without the serve extra",
    ("serve/__init__.py", ".settings"): "the package's names, loaded when asked for, as .app is",
    ("deploy/vllm_resolver.py", "vllm.lora.request"): "vLLM exists only in vLLM's own environment",
    ("deploy/vllm_resolver.py", "vllm.lora.resolver"): "vLLM exists only in vLLM's own environment",
    ("core/targeting.py", "transformers.pytorch_utils"): "at the top, in a try: stays importable without it",
    ("models/quantization.py", "torchao.quantization"): "the optional quant extra, loaded by --quantize int8|int4",
    ("core/quantized.py", "torchao.quantization"): "the optional quant extra, loaded by --quantize int8|int4",
    ("core/quantized.py", "torchao.quantization.granularity"): "the optional quant extra, as above",
    ("core/quantized.py", "bitsandbytes"): "the optional quant extra, loaded by --quantize nf4|fp4",
    ("data/hf.py", "datasets"): "the optional datasets extra, read only when --data names such data",
    ("data/lm.py", "datasets.distributed"): "the optional datasets extra: only a stream it opened reaches it",
    ("data/lm.py", "pyarrow.parquet"): "comes with the optional datasets extra: only a streamed .parquet reaches it",
}


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def lint(copy_root: Path, package: str) -> bool:
    """import-linter's verdict on a copy of the package named `package`, under the project's contracts."""
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    # the copy's name wherever the contracts name the package or one of its modules
    settings = json.loads(re.sub(r"\bunilora(?=[.\"])", package, json.dumps(settings)))
    lines = ["[tool.importlinter]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()
                                       if key != "contracts"]
    for contract in settings["contracts"]:  # JSON's strings, lists and booleans are TOML's too
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in contract.items()]
    config = copy_root / "importlinter.toml"
    config.write_text("\n".join(lines) + "\n")
    configure()
    sys.path.insert(0, str(copy_root))
    importlib.invalidate_caches()
    try:
        return lint_imports(config_filename=str(config), cache_dir=None, no_logo=True)
    finally:
        sys.path.remove(str(copy_root))


@pytest.mark.parametrize("edit, broken", [
    (None, None),
    (("core/errors.py", "from ..cli import main\n"), "is not allowed to import"),  # core reaching up to the CLI
    (("training/loop.py", "from .runs import finetune\n"), "No cycles are allowed"),  # a cycle inside a layer
    # the CLI reaching the serve extra's packages at start (through serve.app, which imports fastapi)
    (("cli/commands.py", "from ..serve.app import create_app\n"), "is not allowed to import fastapi"),
])
def test_the_layer_contracts_fail_on_an_upward_import_or_a_cycle(edit, broken, tmp_path, capsys):
    package = f"unilora_copy_{'clean' if edit is None else Path(edit[0]).stem}"
    shutil.copytree(PACKAGE, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        path = tmp_path / package / edit[0]
        path.write_text(path.read_text() + edit[1])
    kept = lint(tmp_path, package)
    report = capsys.readouterr().out
    assert kept == (edit is None), report
    if broken:
        assert broken in report


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in MODULES:
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("unilora")):
                found += [f"{path.relative_to(PACKAGE)}: {alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found, "give shared helpers a public name: " + ", ".join(found)


def test_no_class_is_longer_than_one_sitting():
    long = [f"{path.relative_to(PACKAGE)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in MODULES for node in ast.walk(tree(path))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 350]
    assert not long, long


def test_imports_sit_at_the_top_of_modules_but_for_named_deferrals():
    found = {}
    for path in MODULES:
        module = tree(path)
        top = set(map(id, module.body))
        for node in ast.walk(module):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    key = (path.relative_to(PACKAGE).as_posix(), ("." * getattr(node, "level", 0)) + name)
                    found[key] = DEFERRED.get(key)
    unexplained = sorted(key for key, why in found.items() if why is None)
    assert not unexplained, f"move these imports to the top of their modules, or name why they wait: {unexplained}"
    assert set(found) == set(DEFERRED), "a deferral listed here no longer exists: drop it from DEFERRED"


def test_the_command_line_holds_no_tensor_code():
    """cli/ parses, calls the library and prints: training, distillation and fitting live below it."""
    for path in (PACKAGE / "cli").glob("*.py"):
        imported = {alias.name.split(".")[0] for node in ast.walk(tree(path)) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree(path))
                     if isinstance(node, ast.ImportFrom) and not node.level}
        assert not imported & {"torch", "transformers", "safetensors", "numpy"}, path.name


@pytest.mark.slow
def test_import_unilora_loads_nothing_until_a_name_is_asked_for():
    """The `unilora` script sets serve's SIGTERM handling before torch loads (unilora/_console.py),
    which needs `import unilora` to cost nothing; every public name still resolves, and dir() lists them."""
    import subprocess

    script = ("import sys, unilora; assert 'torch' not in sys.modules, 'torch loaded'; "
              "assert set(unilora.__all__) <= set(dir(unilora)); "
              "[getattr(unilora, name) for name in unilora.__all__]; "
              "assert unilora.from_pretrained == unilora.AdaptedModel.from_pretrained; print('ok')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
    # the config is the first thing a user builds: the methods are there whatever was imported before
    for first in ("import unilora; config = unilora.AdapterConfig", "from unilora.core.config import AdapterConfig; "
                  "config = AdapterConfig"):
        script = f"{first}(method='vblora'); import unilora; assert len(unilora.METHODS) == 8; print(config.method)"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.stdout.strip() == "vblora", done.stderr[-2000:]
