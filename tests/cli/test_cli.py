"""The command line: SPEC counts, clear one-line errors, inspect, and nothing half-written."""

import subprocess
import sys

import pytest

from unilora import AdapterConfig, get_model
from unilora.cli import main

from conftest import build

# ../shared/SPEC.md, "Reference numbers" (seed 003 Table 1 and the Uni-LoRA paper)
SPEC_COUNTS = [
    (["--arch", "roberta-base", "--method", "lora", "--rank", "8"], 294_912),
    (["--arch", "roberta-large", "--method", "lora", "--rank", "8"], 786_432),
    (["--arch", "roberta-base", "--method", "vera", "--rank", "1024"], 43_008),
    (["--arch", "roberta-large", "--method", "vera", "--rank", "256"], 61_440),
    (["--arch", "roberta-base", "--method", "vblora", "--num-vectors", "90", "--vector-length", "256",
      "--rank", "4", "--topk", "2"], 23_904),
    (["--arch", "roberta-large", "--method", "vblora", "--targets", "all", "--num-vectors", "90",
      "--vector-length", "256", "--rank", "4", "--topk", "2"], 33_408),
    (["--arch", "roberta-large", "--method", "unilora", "--theta-dim", "23040", "--rank", "4"], 23_040),
]


@pytest.mark.parametrize("argv,expected", SPEC_COUNTS)
def test_count_matches_spec(argv, expected, capsys):
    assert main(["count", "--targets", "qv", *argv] if "--targets" not in argv else ["count", *argv]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(expected)


@pytest.mark.slow
def test_count_as_a_module_prints_the_count_last():
    result = subprocess.run(
        [sys.executable, "-m", "unilora", "count", "--arch", "roberta-base", "--method", "vblora"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "23904"  # paper defaults: h=90, b=256, r=4, k=2


def test_count_rejects_b_that_does_not_divide(capsys):
    assert main(["count", "--arch", "roberta-base", "--method", "vblora", "--vector-length", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "b=100" in err and "query" in err and "768x768" in err


def test_finetune_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune", "--data", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and len(err.splitlines()) == 1
    table = tmp_path / "reviews.csv"
    table.write_text("review,stars\ngreat,5\nbad,1\nok,3\n")
    assert main(["finetune", "--data", str(table), "--text-column", "review", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "column 'label'" in err and "['review', 'stars']" in err
    assert not out.exists()


def test_bad_config_values_are_rejected(capsys):
    assert main(["count", "--arch", "roberta-base", "--method", "vblora", "--topk", "500"]) == 2
    assert "topk must be between 1 and num_vectors=90" in capsys.readouterr().err


def test_inspect_reports_counts_and_plots_vblora(tmp_path, capsys):
    model = get_model(build("bert"), AdapterConfig(method="vblora", rank=4, num_vectors=12, vector_length=16,
                                                    target_modules="all-linear", modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "vb")
    png = tmp_path / "plots" / "sel.png"
    assert main(["inspect", str(tmp_path / "vb"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "method: vblora" in out and f"stored_params: {model.stored_param_count():,}" in out
    assert f"stored_bytes: {model.stored_bytes():,}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_select_all_vblora(tmp_path, capsys):
    model = get_model(build("bert"), AdapterConfig(method="vblora", rank=4, num_vectors=12, vector_length=16,
                                                    selection="all", store="logits", target_modules=["query"]))
    model.save_pretrained(tmp_path / "vb")
    assert main(["inspect", str(tmp_path / "vb"), "--png", str(tmp_path / "all.png")]) == 0
    assert "bank_vectors_used" in capsys.readouterr().out and (tmp_path / "all.png").is_file()


def test_inspect_of_a_missing_adapter_fails_cleanly(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_method_is_listed_with_what_it_trains_and_stores(capsys):
    from unilora import METHODS

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS) and all(len(line.split()) > 4 for line in lines)
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(line in shown for line in lines), shown[-600:]  # the same lines close `unilora --help`


def test_peft_spelling_is_accepted_and_a_typo_names_the_closest_option(capsys):
    from unilora.cli.main import build_parser

    args = build_parser().parse_args(["finetune", "--target-modules", "q_proj,v_proj"])
    assert args.targets == "q_proj,v_proj"
    assert main(["finetune", "--targt-modules", "all-linear"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unrecognized arguments: --targt-modules all-linear "
                                               "(--targt-modules: did you mean --target-modules?) "
                                               "(see 'unilora finetune --help')")


def test_a_typo_in_a_local_path_is_never_sent_to_the_hub(tmp_path, capsys, monkeypatch):
    (tmp_path / "data" / "cls-saved").mkdir(parents=True)
    (tmp_path / "data" / "train.csv").write_text("text,label\na,x\n")
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--data", "data/cls-savd", "--out", "run"]) == 2
    assert capsys.readouterr().err.strip() == "error: no such file or folder 'data/cls-savd' (did you mean 'data/cls-saved'?)"
    assert main(["finetune", "--data", "data/trian.csv", "--out", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data file 'data/trian.csv' does not exist (did you mean 'data/train.csv'?)"), err
    assert not (tmp_path / "run").exists()


def test_an_empty_prompt_says_so(capsys, tmp_path):
    assert main(["generate", str(tmp_path), "--prompt", "  "]) == 2
    assert capsys.readouterr().err.strip() == "error: the prompt is empty; give some text with --prompt TEXT"
