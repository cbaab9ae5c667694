"""Hostile input: damaged adapters, odd configs, odd data. Every case ends in one line
`error: ...` (exit 2) or a correct result; nothing non-finite is accepted or written."""

import json
import os
import subprocess
import sys

import pytest
import torch

import unilora
from unilora import AdapterConfig, UniLoraError, get_model
from unilora.cli import main

from conftest import TESTS, build, edit_adapter_config, edit_adapter_weights, method_options, one_line_error


def saved(tmp_path, method="unilora", name="a", **overrides):
    options = {**method_options(method), "target_modules": "all-linear", "modules_to_save": ["classifier"], **overrides}
    model = get_model(build("bert"), AdapterConfig(**options))
    with torch.no_grad():
        for p in model.projection.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def refused(path, *fragments):
    with pytest.raises(UniLoraError) as caught:
        unilora.from_pretrained(build("bert"), path)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


# --- non-finite values ------------------------------------------------------------------------
@pytest.mark.parametrize("method,tensor", [("unilora", "unilora.theta_d"), ("vblora", "vblora.bank"),
                                           ("vblora", "vblora.topk_weights"), ("unilora", "head.classifier.weight")])
def test_non_finite_tensors_are_refused_on_load(method, tensor, tmp_path, capsys):
    _, path = saved(tmp_path, method)
    edit_adapter_weights(path, lambda t: t[tensor].view(-1).__setitem__(0, float("nan")))
    refused(path, "NaN or infinite", tensor)
    one_line_error(["inspect", str(path)], capsys, "NaN")
    one_line_error(["export", str(path), str(tmp_path / "peft")], capsys, "NaN")
    assert not (tmp_path / "peft").exists()


def test_save_refuses_a_diverged_adapter(tmp_path):
    model, _ = saved(tmp_path)
    with torch.no_grad():
        model.projection.theta_d[3] = float("inf")
    with pytest.raises(UniLoraError, match="diverged"):
        model.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "b").exists()


# --- VB-LoRA selections -----------------------------------------------------------------------
@pytest.mark.parametrize("change,fragment", [
    (lambda t: t["vblora.topk_weights"].fill_(-5.0), "weights must lie in [0, 1]"),
    (lambda t: t["vblora.topk_weights"].fill_(3.0), "weights must lie in [0, 1]"),
    (lambda t: t["vblora.topk_indices"][:, 1].copy_(t["vblora.topk_indices"][:, 0]), "repeat a bank vector"),
    (lambda t: t["vblora.topk_indices"].fill_(200), "[0, 12)"),
])
def test_vblora_selections_out_of_range_are_refused(change, fragment, tmp_path):
    _, path = saved(tmp_path, "vblora")
    edit_adapter_weights(path, change)
    refused(path, fragment)


# --- configs: checksums, layout, types ----------------------------------------------------------
def test_any_unsigned_change_to_a_saved_file_is_refused(tmp_path):
    _, path = saved(tmp_path)
    config = path / "adapter_config.json"
    config.write_text(config.read_text().replace('"alpha": null', '"alpha": 9.0'))
    refused(path, "changed after it was saved")
    _, path = saved(tmp_path, name="b")
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40
    weights.write_bytes(bytes(data))
    refused(path, "does not match the checksum")


def test_swapped_layer_names_are_refused_even_when_re_signed(tmp_path):
    _, path = saved(tmp_path, target_modules=["query", "value"])

    def swap(meta):
        meta["layout"][0][0], meta["layout"][1][0] = meta["layout"][1][0], meta["layout"][0][0]

    edit_adapter_config(path, swap)
    refused(path, "fingerprint")


@pytest.mark.parametrize("method,key", [("unilora", "index_sha256"), ("vera", "shared_sha256"),
                                        ("fastfood", "gauss_summary")])
def test_seeded_draw_checksum_is_required(method, key, tmp_path):
    _, path = saved(tmp_path, method)
    edit_adapter_config(path, lambda meta: meta["projection"].pop(key))
    refused(path, key)


def test_a_malformed_fastfood_draw_summary_is_refused(tmp_path):
    _, path = saved(tmp_path, "fastfood")
    edit_adapter_config(path, lambda meta: meta["projection"].update(gauss_summary=["a", "b", "c", "d", "e"]))
    refused(path, "gauss_summary")


def test_rank_of_config_and_layout_must_agree(tmp_path):
    _, path = saved(tmp_path)
    edit_adapter_config(path, lambda meta: meta["adapter"].update(rank=8))
    refused(path, "rank 4 but the config says rank 8")


@pytest.mark.parametrize("change,fragment", [
    (lambda m: m["adapter"].update(theta_dim="9000"), "theta_dim must be an integer"),
    (lambda m: m["adapter"].update(theta_dim=9000.0), "theta_dim must be an integer"),
    (lambda m: m["adapter"].update(num_vectors="60"), "num_vectors must be an integer"),
    (lambda m: m["adapter"].update(dropout=-1), "dropout"),
    (lambda m: m.pop("layout"), "'layout' must be"),
    (lambda m: m["layout"].__setitem__(0, ["x", 32]), "layout row 0"),
    (lambda m: m["layout"].__setitem__(0, [1, 2, 3, 4]), "layout row 0"),
    (lambda m: m.update(adapter=[1, 2]), "'adapter' must be an object"),
    (lambda m: m["adapter"].update(surprise=1), "unknown adapter config keys"),
])
def test_config_fields_of_the_wrong_type_give_one_line(change, fragment, tmp_path, capsys):
    _, path = saved(tmp_path)
    edit_adapter_config(path, change)
    one_line_error(["inspect", str(path)], capsys, fragment)
    refused(path, fragment)


@pytest.mark.parametrize("content,fragment", [(b"[1, 2]", "must hold a JSON object"), (b"42", "must hold a JSON object"),
                                              (b"\xff\xfe{", "not UTF-8"), (b'{"format": "unil', "not valid JSON"),
                                              (b"[" * 100000, "not valid JSON")])
def test_undecodable_or_non_object_configs_give_one_line(content, fragment, tmp_path, capsys):
    _, path = saved(tmp_path)
    (path / "adapter_config.json").write_bytes(content)
    one_line_error(["inspect", str(path)], capsys, fragment)


def test_a_huge_declared_size_is_refused_before_allocating(tmp_path):
    _, path = saved(tmp_path, "vblora", store="logits")
    edit_adapter_config(path, lambda meta: meta["adapter"].update(num_vectors=1_000_000))
    refused(path, "shape")  # the bank in the file is 12 x 16: refused from the header alone
    # a consistent file (header and config agree) that asks for more memory than there is
    _, path = saved(tmp_path, "unilora", name="b")

    def giant(meta):
        meta["layout"][0][1] = 2**31
        meta["layout_fingerprint"] = unilora.core.layout.Layout.from_json(meta["layout"]).fingerprint()
        meta["D"] = unilora.core.layout.Layout.from_json(meta["layout"]).D

    edit_adapter_config(path, giant)
    with pytest.raises(UniLoraError, match="would allocate"):
        unilora.tools.inspection.describe(path)


# --- evaluate: labels by name, data from the adapter ----------------------------------------------
def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_run(tmp_path, labels=("democrat", "republican")):
    rows = [{"text": f"speech number {i} about {'taxes' if i % 2 else 'schools'}", "label": labels[i % len(labels)]}
            for i in range(24)]
    data = write_rows(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(data), "--out", str(out), "--epochs", "1", "--no-progress",
                 "--train-limit", "16"]) == 0
    return out / "adapter", rows


@pytest.mark.slow
def test_evaluate_matches_labels_by_name_and_uses_the_recorded_data(tmp_path, capsys):
    adapter, rows = train_run(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "--json", str(adapter)]) == 0  # no --data: the data recorded in the adapter
    recorded = json.loads(capsys.readouterr().out)
    assert recorded["dataset"] == "train"
    renamed = write_rows(tmp_path / "renamed.jsonl",
                         [{"text": r["text"], "label": {"democrat": "a_rep", "republican": "z_dem"}[r["label"]]} for r in rows])
    one_line_error(["evaluate", str(adapter), "--data", str(renamed)], capsys, "['a_rep', 'z_dem']", "does not know")
    one_line_error(["evaluate", str(adapter), "--data", str(write_rows(
        tmp_path / "one-unknown.jsonl", [{"text": r["text"], "label": r["label"].replace("democrat", "x_dem")} for r in rows]))],
        capsys, "['x_dem']")


@pytest.mark.slow
def test_evaluate_maps_label_ids_when_the_data_has_fewer_labels(tmp_path, capsys):
    adapter, rows = train_run(tmp_path, labels=("a", "b", "c"))
    two = write_rows(tmp_path / "two.jsonl", [r for r in rows if r["label"] != "b"])
    capsys.readouterr()
    assert main(["evaluate", str(adapter), "--data", str(two)]) == 0  # ids 0, 1 here are a, c there
    assert "note: labels matched by name (a->a, c->c)" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_without_recorded_data_asks_for_it(tmp_path, capsys):
    adapter, _ = train_run(tmp_path)
    (tmp_path / "train.jsonl").unlink()
    capsys.readouterr()
    one_line_error(["evaluate", str(adapter)], capsys, "pass --data")


# --- data files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,fragment", [
    ('{"text": "a", "label": "x"}\n{"label": "y"}\n', "data.jsonl:2: field 'text' is missing"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', "data.jsonl:2: field 'label' is null"),
    ('{"text": "a", "label": "x"}\n[1, 2]\n', "data.jsonl:2 is a JSON list"),
    (b'{"text": "caf\xe9", "label": "x"}\n', "data.jsonl:1: byte 0xe9 is not UTF-8"),
])
def test_bad_data_rows_name_file_line_and_field(content, fragment, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(["finetune", "--data", str(data), "--out", str(tmp_path / "o")], capsys, fragment)
    assert not (tmp_path / "o").exists()


def test_labels_seen_only_in_the_test_data_are_refused(tmp_path, capsys):
    train = write_rows(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8)])
    test = write_rows(tmp_path / "test.jsonl", [{"text": "t", "label": "c"}, {"text": "u", "label": "a"}])
    one_line_error(["finetune", "--data", str(train), "--test-data", str(test), "--out", str(tmp_path / "o")],
                   capsys, "['c']", "never in the training data")


@pytest.mark.slow
def test_a_json_array_file_trains_and_tiny_data_warns(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(6)]))
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "o"), "--epochs", "1", "--no-progress"]) == 0
    assert "warning: few training examples" in capsys.readouterr().err
    assert (tmp_path / "o" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--train-limit", "--max-length"])
def test_zero_or_negative_counts_are_refused_by_the_parser(flag, tmp_path, capsys):
    for value in ("0", "-3"):
        one_line_error(["finetune", flag, value, "--out", str(tmp_path / "o")], capsys, flag, "positive integer")


@pytest.mark.slow
def test_max_length_above_the_model_limit_is_clamped(tmp_path, capsys):
    data = write_rows(tmp_path / "d.jsonl", [{"text": f"word {i}", "label": "ab"[i % 2]} for i in range(12)])
    assert main(["finetune", "--data", str(data), "--max-length", "3004", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 0
    assert "--max-length 3004 is above this model's limit; using 512" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["settings"]["max_length"] == 3004


def test_inspect_never_writes_into_an_unwritable_adapter_folder(tmp_path, capsys, monkeypatch):
    _, path = saved(tmp_path, "vblora")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    one_line_error(["inspect", str(path)], capsys, "is not writable", "--png")
    (tmp_path / "plots").mkdir()
    assert main(["inspect", str(path), "--png", str(tmp_path / "plots" / "p.png")]) == 0
    assert (tmp_path / "plots" / "p.png").is_file() and not list(tmp_path.glob("*.png"))


# --- compress: PEFT files -----------------------------------------------------------------------------
def peft_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("bert"), LoraConfig(r=4, target_modules=["query", "value"]))
    model.save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "peft"


def test_compress_refuses_damaged_peft_adapters(tmp_path, capsys):
    peft = peft_adapter(tmp_path)
    config = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps({**config, "r": "eight"}))
    one_line_error(["compress", str(tmp_path / "c"), "--peft-lora", str(peft)], capsys, "'r' must be an integer")
    (peft / "adapter_config.json").write_text(json.dumps(config))
    weights = peft / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    one_line_error(["compress", str(tmp_path / "c"), "--peft-lora", str(peft)], capsys, "adapter_model.safetensors")
    assert not (tmp_path / "c").exists()


# --- fuzzing: truncations, byte flips and config mutations under a memory bound --------------------------
@pytest.mark.slow
def test_fuzzed_adapter_files_load_correctly_or_fail_with_our_error():
    script = str(TESTS / "fuzz_adapters.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fuzzed" in result.stdout
