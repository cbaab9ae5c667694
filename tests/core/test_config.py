"""core/config.py on its own: what each kind of option accepts, the common fields, a method's options
through AdapterConfig, and the round trip of a saved config."""

import dataclasses
import math

import pytest
from conftest import method_options

import unilora  # noqa: F401  (registers the methods)
from unilora import METHODS, AdapterConfig, UniLoraError
from unilora.core.config import Choice, Integer, Number, command_line_options
from unilora.core.registry import projection_class


@pytest.mark.parametrize("check, good, bad", [
    (Integer(1), [1, 2**40], [0, -1, 1.5, True, "3", None]),
    (Integer(1, 8), [1, 8], [9, 0]),
    (Integer(1, 8, optional=True), [None, 4], [9, "4"]),
    (Number(0.0, open_low=True), [1e-9, 3, 2.5], [0.0, -1, math.nan, math.inf, True, "1"]),
    (Number(0.0, 0.5), [0.0, 0.5], [0.5000001, -0.1]),
    (Choice(("a", "b")), ["a", "b"], ["c", None, 1]),
])
def test_each_check_accepts_exactly_its_span(check, good, bad):
    assert all(check.problem(v) is None for v in good)
    for value in bad:
        problem = check.problem(value)
        assert problem is not None and repr(value) in problem, (value, problem)


def test_command_line_values_parse_or_say_what_is_expected():
    assert Integer(1, 8).parse("3") == 3
    assert Number(0.0, open_low=True).parse("0.25") == 0.25
    for check, text in [(Integer(1, 8), "9"), (Integer(1), "x"), (Number(0.0, open_low=True), "0"),
                        (Number(), "nan")]:
        with pytest.raises(ValueError, match=f"got '{text}'"):
            check.parse(text)


@pytest.mark.parametrize("field, value, fragment", [
    ("rank", 0, "rank must be an integer"),
    ("rank", True, "rank must be an integer"),
    ("seed", -1, "seed must be an integer"),
    ("alpha", 0, "alpha must be a positive number"),
    ("dropout", 1.0, "dropout must be a finite number"),
    ("target_modules", [], "target_modules must be"),
    ("target_modules", ["query", ""], "target_modules must be"),
    ("modules_to_save", "classifier", "modules_to_save must be a list"),
    ("method", "lora2", "unknown method 'lora2'"),
])
def test_common_fields_are_checked_up_front(field, value, fragment):
    with pytest.raises(UniLoraError, match=fragment):
        AdapterConfig(**{field: value})


def test_a_methods_own_option_is_checked_by_its_declared_check():
    with pytest.raises(UniLoraError, match="theta_dim must be an integer >= 1"):
        AdapterConfig(method="unilora", theta_dim=0)
    with pytest.raises(UniLoraError, match="selection must be one of"):
        AdapterConfig(method="vblora", selection="best")
    with pytest.raises(UniLoraError, match="zero_delta' needs theta_dim >= 2"):  # a check across fields
        AdapterConfig(method="unilora", init="zero_delta", theta_dim=1)


def test_another_methods_option_is_checked_then_ignored_and_an_unknown_one_refused():
    config = AdapterConfig(method="lora", theta_dim=100)  # saved configs of earlier versions hold every field
    assert "theta_dim" not in config.to_dict(keep_all=True)
    with pytest.raises(AttributeError, match="has no field 'theta_dim'"):
        config.theta_dim
    with pytest.raises(UniLoraError, match="theta_dim must be an integer"):  # damaged, even where unused
        AdapterConfig(method="lora", theta_dim="many")
    with pytest.raises(UniLoraError, match=r"unknown adapter config keys \['thetadim'\]"):
        AdapterConfig(method="unilora", thetadim=100)


@pytest.mark.parametrize("method", METHODS)
def test_a_saved_config_reads_back_equal(method):
    config = AdapterConfig(**{**method_options(method), "target_modules": "all-linear", "alpha": 8.0, "seed": 5})
    saved = config.to_dict()
    assert AdapterConfig.from_dict(saved) == config
    options = projection_class(method).options
    own = {f.name for f in dataclasses.fields(options)}
    common = {"method", "target_modules", "rank", "alpha", "dropout", "modules_to_save", "seed"}
    assert set(saved) - common <= own  # another method's options are never written
    assert own - set(options.left_out_at_default) <= set(saved)


def test_replace_gives_a_validated_copy():
    config = AdapterConfig(method="unilora", theta_dim=64)
    bigger = config.replace(theta_dim=128, rank=8)
    assert (bigger.theta_dim, bigger.rank, config.theta_dim, config.rank) == (128, 8, 64, 4)
    with pytest.raises(UniLoraError, match="theta_dim"):
        config.replace(theta_dim=-5)


def test_from_dict_refuses_what_is_not_a_config():
    with pytest.raises(UniLoraError, match="must be a JSON object"):
        AdapterConfig.from_dict(["unilora"])
    with pytest.raises(UniLoraError, match="unknown method"):
        AdapterConfig.from_dict({"method": 3})


def test_command_line_options_name_the_methods_that_have_each():
    options = command_line_options()
    check, help_text, methods = options["theta_dim"]
    assert methods == ["unilora", "fastfood"] and "θ_d" in help_text and check.problem(0)
    assert options["topk"][2] == ["vblora"]
    assert all(help_text for _, help_text, _ in options.values())
