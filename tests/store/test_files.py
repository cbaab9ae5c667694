"""Never lose a user's data: what every writer (save_pretrained, export, compress, finetune)
may replace, atomic replacement under a crash, and modes that follow the umask."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import unilora
from unilora import AdapterConfig, UniLoraError, get_model
from unilora.cli import main

from conftest import TESTS, build, logits_of, method_options


def saved(tmp_path, name="a", seed=3, method="unilora"):
    model = get_model(build("bert"), AdapterConfig(**{**method_options(method), "seed": seed,
                                                      "target_modules": "all-linear", "modules_to_save": ["classifier"]}))
    with torch.no_grad():
        model.projection.theta.add_(0.1 * seed)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def test_export_never_deletes_foreign_files(tmp_path, capsys):
    _, adapter = saved(tmp_path)
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "notes" / "n.md").write_text("also mine")
    assert main(["export", str(adapter), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "notes"]
    # --overwrite writes our files beside the user's and leaves theirs alone
    assert main(["export", str(adapter), str(out), "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "notes" / "n.md").read_text() == "also mine"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_export_onto_its_source_is_refused(tmp_path, capsys):
    _, adapter = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    for target in (adapter, adapter / "inside"):
        assert main(["export", str(adapter), str(target), "--overwrite"]) == 2
        assert "source adapter" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_save_never_replaces_a_file_unilora_did_not_write(tmp_path):
    model, _ = saved(tmp_path)
    peft_like = tmp_path / "peft"
    peft_like.mkdir()
    (peft_like / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(UniLoraError, match="was not written by unilora"):
        model.save_pretrained(peft_like)
    assert json.loads((peft_like / "adapter_config.json").read_text()) == {"peft_type": "LORA", "r": 8}
    with pytest.raises(UniLoraError, match="already exists"):
        model.save_pretrained(tmp_path / "a", overwrite=False)


def test_save_beside_other_files_keeps_them(tmp_path):
    model, _ = saved(tmp_path)
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    model.save_pretrained(folder)
    model.save_pretrained(folder)  # again, over our own files
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "tokenizer.json"]
    assert unilora.from_pretrained(build("bert"), folder) is not None


def test_outputs_follow_the_umask(tmp_path):
    model, _ = saved(tmp_path)
    old = os.umask(0o027)
    try:
        model.save_pretrained(tmp_path / "masked")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "masked").stat().st_mode) == 0o750
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / "masked" / name).stat().st_mode) == 0o640


CRASHING_SAVE = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    import unilora.store.writing as writing
    from unilora import AdapterConfig, get_model
    from conftest import build, method_options
    kill_at, calls = int(sys.argv[1]), [0]

    def step(fn):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os._exit(9)  # the writer dies here, between two steps of the replace
            return fn(*args, **kwargs)
        return wrapped

    for name in ("exchange", "write_json_atomic", "apply_umask"):
        setattr(writing, name, step(getattr(writing, name)))
    writing.os.replace = step(writing.os.replace)
    writing.shutil.rmtree = step(writing.shutil.rmtree)
    model = get_model(build("bert"), AdapterConfig(**{{**method_options("unilora"), "seed": 5,
                                                      "target_modules": "all-linear"}}))
    model.save_pretrained(sys.argv[2])
""")


@pytest.mark.slow
def test_a_crash_during_replace_leaves_the_whole_old_or_the_whole_new_adapter(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_SAVE.format(tests=str(TESTS)))
    new = get_model(build("bert"), AdapterConfig(**{**method_options("unilora"), "seed": 5, "target_modules": "all-linear"}))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    outcomes = set()
    for kill_at in range(1, 12):
        old_model, path = saved(tmp_path, name=f"run{kill_at}", seed=1)
        old_model.eval()
        done = subprocess.run([sys.executable, str(script), str(kill_at), str(path)], capture_output=True)
        loaded = unilora.from_pretrained(build("bert"), path)
        got = logits_of(loaded, ids)
        if torch.equal(loaded.projection.theta_d, old_model.projection.theta_d):
            assert torch.equal(got, logits_of(old_model, ids))
            outcomes.add("old")
        else:
            assert torch.equal(loaded.projection.theta_d, new.projection.theta_d)
            outcomes.add("new")
        if done.returncode == 0:
            break
    assert outcomes == {"old", "new"} and done.returncode == 0, "killed before and after the switch, then completed"


def test_finetune_checks_its_output_folder_before_training(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.txt").write_text("precious")
    argv = ["finetune", "--data", str(data), "--out", str(out), "--model", str(tmp_path / "no-model"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "results.txt" in err
    file_parent = tmp_path / "a-file"
    file_parent.write_text("x")
    assert main(["finetune", "--data", str(data), "--out", str(file_parent / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (out / "results.txt").read_text() == "precious"
