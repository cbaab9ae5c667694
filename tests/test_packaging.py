"""What `pip install unilora` gives a user: the wheel built from this checkout, installed alone (no
extras, no editable path, no packages of this environment) into a new virtual environment, runs the
commands that need no extra and names the extra of one that does."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from serving import smollm2_tokenizer, write_tiny_llama

import unilora

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "unilora"


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"
    return done


def build_wheel(dist: Path) -> Path:
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, ROOT], timeout=600)
    (wheel,) = dist.glob("unilora-*.whl")
    return wheel


def check_wheel_contents(wheel: Path) -> None:
    """Every module of the package (it reads no other file of its own), the two entry points, and
    nothing of the tests."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_text = archive.read(entry_points).decode()
    modules = {path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*.py")}
    packaged = {name for name in names if name.startswith("unilora/")}
    assert packaged == modules, (sorted(modules - packaged), sorted(packaged - modules))
    assert not [name for name in names if name.startswith("tests/") or "conftest" in name]
    assert "unilora = unilora._console:run" in entry_text
    assert "unilora_resolver = unilora.deploy.vllm_resolver:register" in entry_text


def write_prompt_completion(path: Path, rows: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what comes after {i}?", "completion": f" {i + 1}."})
                            + "\n" for i in range(rows)))
    return path


@pytest.mark.slow
def test_the_wheel_alone_runs_every_command_but_serve(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    check_wheel_contents(wheel)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=300)  # its own site-packages only
    python, command = venv / "bin" / "python", venv / "bin" / "unilora"
    # the wheel's own dependencies: torch==2.13.0 (the CPU build pip finds on this machine), transformers, ...
    run([python, "-m", "pip", "install", "--quiet", wheel], timeout=900)
    present = run([python, "-c", "import importlib.util as u, json; print(json.dumps([m for m in "
                   "('fastapi', 'uvicorn', 'ray', 'datasets', 'matplotlib', 'gguf', 'peft') if u.find_spec(m)]))"])
    assert json.loads(present.stdout) == []  # no extra came along

    env = {"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    assert run([command, "--version"], env=env).stdout.strip() == f"unilora {unilora.__version__}"
    counted = run([command, "count", "--arch", "roberta-base", "--method", "unilora"], env=env)
    assert counted.stdout.strip().splitlines()[-1] == "23040"

    model = write_tiny_llama(tmp_path / "model", smollm2_tokenizer())
    data = write_prompt_completion(tmp_path / "pairs.jsonl", rows=40)  # 32 to train on: 4 steps of 8
    trained = run([command, "finetune", "--model", model, "--data", data, "--epochs", "1", "--batch-size", "8",
                   "--theta-dim", "512", "--out", tmp_path / "run", "--no-progress"], env=env, timeout=600)
    assert "1 epoch = 4 optimizer steps" in trained.stderr
    assert "eval loss:" in trained.stdout
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["adapter"]["method"] == "unilora"

    served = subprocess.run([command, "serve", "--adapters", tmp_path / "run"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert served.returncode == 2
    assert served.stderr.strip().splitlines() == [
        "error: `unilora serve` needs the 'serve' extra (fastapi, uvicorn, prometheus_client, python_multipart not "
        "installed): "
        'pip install "unilora[serve]"']
