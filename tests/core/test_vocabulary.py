"""The rest of core/: the seeded streams every stored draw comes from, the layout of θ_D, and the small
shared checks (finite tensors, a missing extra, the cache folder)."""

import numpy as np
import pytest
import torch

from unilora import UniLoraError
from unilora.core.extras import require
from unilora.core.finite import check_finite
from unilora.core.layout import Layout, Slot
from unilora.core.resources import cache_root
from unilora.core.rng import SeededStream

MASK64 = 2**64 - 1


def splitmix64(base: int, n: int) -> list[int]:
    """SplitMix64 in plain Python integers, written from its definition, at counters 1..n."""
    out = []
    for i in range(1, n + 1):
        z = (base + i * 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


def test_the_stream_is_splitmix64_at_counter_positions():
    stream = SeededStream(7, "vera-A")
    assert stream.uint64(50).tolist() == splitmix64(int(stream._base), 50)


def test_streams_are_named_by_seed_and_name_and_repeat_exactly():
    a, b = SeededStream(1, "x").uint64(1000), SeededStream(1, "x").uint64(1000)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, SeededStream(2, "x").uint64(1000))
    assert not np.array_equal(a, SeededStream(1, "y").uint64(1000))
    assert np.array_equal(SeededStream(1, "x").uint64(10), a[:10])  # a prefix never depends on n


def test_stream_shapes_are_what_they_say():
    stream = SeededStream(3, "s")
    u = stream.uniform(10_000)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02
    assert sorted(stream.permutation(500).tolist()) == list(range(500))
    assert set(stream.signs(1000).tolist()) == {-1.0, 1.0}
    normal = stream.normal(20_000)
    assert abs(normal.mean()) < 0.03 and abs(normal.std() - 1.0) < 0.03


def layout() -> Layout:
    return Layout([Slot("l0.q", 5, 3, 2), Slot("l1.v", 4, 6, 2)])


def test_theta_d_is_a_then_b_transposed_per_layer():
    lay = layout()
    assert lay.D == 2 * 5 + 2 * 3 + 2 * 4 + 2 * 6
    flat = torch.arange(lay.D, dtype=torch.float32)
    (a0, bt0), (a1, bt1) = lay.split(flat)
    assert a0.shape == (2, 5) and bt0.shape == (2, 3) and a1.shape == (2, 4) and bt1.shape == (2, 6)
    assert a0[1, 0].item() == 5 and bt0[0, 0].item() == 10 and a1[0, 0].item() == 16
    assert bt0.data_ptr() == flat[10:].data_ptr()  # views, no copies
    mask = lay.b_entry_mask()
    assert mask.tolist() == [False] * 10 + [True] * 6 + [False] * 8 + [True] * 12


def test_a_layout_reads_back_and_any_change_changes_its_fingerprint():
    lay = layout()
    assert Layout.from_json(lay.to_json()).fingerprint() == lay.fingerprint()
    changed = [Layout([Slot("l0.k", 5, 3, 2), Slot("l1.v", 4, 6, 2)]),
               Layout([Slot("l0.q", 5, 3, 2), Slot("l1.v", 4, 6, 3)]),
               Layout([Slot("l1.v", 4, 6, 2), Slot("l0.q", 5, 3, 2)])]
    assert len({lay.fingerprint(), *(c.fingerprint() for c in changed)}) == 4
    with pytest.raises(UniLoraError, match="l0"):
        lay.require_same(changed[0])


def test_non_finite_tensors_are_named_and_counted():
    check_finite({"ok": torch.ones(3), "ids": torch.tensor([1, 2])}, "file", "retrain")
    with pytest.raises(UniLoraError, match=r"file: tensor 'theta' holds 2 NaN or infinite values; retrain"):
        check_finite({"theta": torch.tensor([1.0, float("nan"), float("inf")])}, "file", "retrain")


def test_a_missing_extra_is_one_line_naming_its_install():
    require("serve", "serving", modules=("json",))  # present: nothing happens
    with pytest.raises(UniLoraError) as caught:
        require("plots", "inspect's plots", modules=("no_such_module_here",), hint=", or pass --no-plot")
    message = str(caught.value)
    assert "\n" not in message
    assert message == ("inspect's plots needs the 'plots' extra (no_such_module_here not installed): "
                       'pip install "unilora[plots]", or pass --no-plot')


def test_one_cache_root_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("UNILORA_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "own"
    monkeypatch.delenv("UNILORA_CACHE")
    assert cache_root() == tmp_path / "xdg" / "unilora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "unilora"
