"""Compressing existing low-rank updates into Uni-LoRA (closed form + refinement) and VB-LoRA."""

import pytest
import torch
from safetensors.torch import save_file

import unilora
from unilora import AdapterConfig
from unilora.cli import main
from unilora.tools.compress import LowRankUpdate, balanced, compress, delta_error, from_peft_lora

from conftest import build, logits_of, one_line_error, peft_lora_dir


def test_balancing_keeps_delta_w_and_equalises_the_factors():
    g = torch.Generator().manual_seed(0)
    up = LowRankUpdate("x", torch.randn(4, 12, generator=g) * 10, torch.randn(20, 4, generator=g) * 0.01)
    a, bt = balanced(up, 4)
    assert torch.allclose(bt.t() @ a, up.b @ up.a, atol=1e-5)
    assert torch.allclose(a.norm(dim=1), bt.norm(dim=1), rtol=1e-4)


def test_gram_error_equals_the_dense_error():
    g = torch.Generator().manual_seed(1)
    up = LowRankUpdate("x", torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g))
    a, bt = torch.randn(2, 10, generator=g), torch.randn(2, 7, generator=g)
    dense = ((bt.t() @ a - up.b @ up.a) ** 2).sum()
    assert torch.allclose(delta_error([(a, bt)], [up]), dense, rtol=1e-4)


def test_full_dimension_unilora_reproduces_the_peft_adapter_exactly(tmp_path, ids, capsys):
    # down_proj sorts before self_attn in the file but comes after it in the model: the adapter's
    # layout keeps the file's order, and loading must not care
    peft_model, peft_dir = peft_lora_dir(tmp_path, targets=("q_proj", "v_proj", "down_proj"))
    D = sum(u.a.numel() + u.b.numel() for u in from_peft_lora(peft_dir))
    assert main(["compress", str(tmp_path / "ours"), "--peft-lora", str(peft_dir), "--method", "unilora",
                 "--theta-dim", str(D)]) == 0
    out = capsys.readouterr().out
    assert "closed form 0.0000" in out and "ratio 1.0000" in out
    ours = unilora.from_pretrained(build("llama"), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(logits_of(ours, ids), logits_of(peft_model, ids), atol=1e-4)


@pytest.mark.parametrize("theta_dim, warned", [(40, True), ("D", False)])
def test_a_fit_that_keeps_little_of_the_update_warns(tmp_path, capsys, theta_dim, warned):
    _, peft_dir = peft_lora_dir(tmp_path)
    D = sum(u.a.numel() + u.b.numel() for u in from_peft_lora(peft_dir))
    assert main(["compress", str(tmp_path / "small"), "--peft-lora", str(peft_dir), "--method", "unilora",
                 "--theta-dim", str(D if theta_dim == "D" else theta_dim)]) == 0
    captured = capsys.readouterr()
    error = float(captured.out.split("closed form ")[1].split()[0].rstrip(","))
    assert (error > 0.5) == warned
    assert ("warning: relative error" in captured.err) == warned


def test_smaller_d_has_error_and_refinement_reduces_it(tmp_path):
    _, peft_dir = peft_lora_dir(tmp_path)
    updates = from_peft_lora(peft_dir)
    config = AdapterConfig(method="unilora", rank=4, theta_dim=400, target_modules=[u.name for u in updates])
    _, _, closed = compress(updates, config)
    _, _, refined = compress(updates, config, steps=200, lr=1e-2)
    assert 0.05 < closed["relative_error_closed_form"] < 1.0
    assert refined["relative_error_refined"] < 0.9 * closed["relative_error_closed_form"]
    assert closed["size_ratio"] == pytest.approx(400 / closed["original_params"])


def test_vblora_bank_fit_by_refinement(tmp_path):
    _, peft_dir = peft_lora_dir(tmp_path)
    updates = from_peft_lora(peft_dir)
    config = AdapterConfig(method="vblora", rank=4, num_vectors=16, vector_length=16, target_modules=[u.name for u in updates])
    _, _, report = compress(updates, config, steps=300, lr=1e-2)
    assert report["relative_error_refined"] < 0.8 * report["relative_error_closed_form"]


def test_full_finetune_checkpoints_via_truncated_svd(tmp_path, capsys):
    base = build("bert")
    state = {k: v.clone().contiguous() for k, v in base.state_dict().items()}
    tuned = dict(state)
    g = torch.Generator().manual_seed(3)
    for k in state:
        if k.endswith("attention.self.query.weight"):
            tuned[k] = state[k] + torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g) * 0.1
    save_file(state, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    assert main(["compress", str(tmp_path / "ours"), "--base-weights", str(tmp_path / "base.safetensors"),
                 "--finetuned-weights", str(tmp_path / "tuned.safetensors"), "--targets", "query",
                 "--method", "lora", "--rank", "2"]) == 0
    assert "closed form 0.0000" in capsys.readouterr().out  # rank-2 ΔW, rank-2 LoRA: exact


def test_compress_input_errors(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "o"), "--peft-lora", str(tmp_path / "none")]) == 2
    assert "is not a PEFT LoRA adapter" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "o")]) == 2
    assert "either --peft-lora" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options", [["--temperature", "2"], ["--epochs", "3", "--hidden-weight", "0"],
                                     ["--train-limit", "100"], ["--group-lr", "theta=1e-2"], ["--no-group-by-length"],
                                     ["--hidden-layers", "all"]])
def test_distillation_options_without_data_are_refused(tmp_path, capsys, options):
    """Without --data a PEFT LoRA gets a weight-space fit, which reads none of these: the user who
    gave them meant to distil, and is told so instead of getting a fit that ignored them."""

    _, peft_dir = peft_lora_dir(tmp_path)
    out = tmp_path / "fit"
    err = one_line_error(["compress", str(out), "--peft-lora", str(peft_dir), "--method", "unilora", *options],
                         capsys, "give --data", "for a weight-space fit")
    assert all(option in err for option in options if option.startswith("--") and option != "--no-group-by-length")
    assert not out.exists()


def test_targets_of_a_lora_are_refused(tmp_path, capsys):
    """A LoRA's compact adapter adapts the LoRA's layers: --targets would do nothing."""

    _, peft_dir = peft_lora_dir(tmp_path)
    out = tmp_path / "fit"
    one_line_error(["compress", str(out), "--peft-lora", str(peft_dir), "--method", "unilora", "--targets", "q_proj"],
                   capsys, "drop --targets")
    assert not out.exists()
