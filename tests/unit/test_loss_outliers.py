"""rsq.loss_outliers: modules whose loss is orders of magnitude above the same linear's in other layers."""

from __future__ import annotations

import math

import pytest

from rsq.loss_outliers import RAW_RATIO, find_loss_outliers, outlier_line

NAMES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def smooth_profile(n: int = 24) -> list[tuple[int, dict[str, float]]]:
    """Losses growing 1000x with depth (geometrically, ~35 % a layer), each linear at its own scale:
    what a healthy run's raw losses look like."""
    scale = {name: 10.0**k for k, name in enumerate(NAMES)}
    return [(i, {name: scale[name] * 1000 ** (i / (n - 1)) for name in NAMES}) for i in range(n)]


def test_smooth_profile_is_not_flagged():
    # the largest, 1000^(23/23), against the median of the others, 1000^(11/23) ~ 27: ratio ~37,
    # under the raw-loss threshold (1e4) and 100 (relative losses do not span 1000x: see REL_RATIO)
    assert find_loss_outliers(smooth_profile(), RAW_RATIO) == []
    assert find_loss_outliers(smooth_profile(), 100) == []


def test_known_outliers_are_flagged_with_their_ratio():
    layers = smooth_profile()
    # the failure: the down_proj of layers 2 and 3 far above the rest (1.5e4 and 1.3e7 vs ~200)
    layers[2][1]["mlp.down_proj"] = 1.5e4 * 1e3
    layers[3][1]["mlp.down_proj"] = 1.3e7 * 1e3
    found = find_loss_outliers(layers, 100)
    assert [(e["layer"], e["name"]) for e in found] == [(2, "mlp.down_proj"), (3, "mlp.down_proj")]
    # independent oracle: the median of the other 23 down_proj values, computed here by sorting
    others = sorted(v["mlp.down_proj"] for i, v in layers if i != 3)
    median = others[len(others) // 2]  # 23 values: the middle one
    assert found[1]["median"] == pytest.approx(median)
    assert found[1]["ratio"] == pytest.approx(1.3e10 / median)
    assert found[1]["value"] == 1.3e10
    # at the raw-loss threshold (1e4) only layer 3 (ratio ~4.8e5) remains; layer 2's is ~550
    assert [e["layer"] for e in find_loss_outliers(layers, RAW_RATIO)] == [3]


def test_threshold_is_strict_and_per_kind():
    # 10 layers of 1.0 with one at exactly 100x: not flagged; at 101x: flagged. The other linear's
    # values (1e6 everywhere) do not count as peers of the first.
    base = [(i, {"a": 1.0, "b": 1e6}) for i in range(10)]
    base[4][1]["a"] = 100.0
    assert find_loss_outliers(base, 100) == []
    base[4][1]["a"] = 101.0
    assert [(e["layer"], e["name"]) for e in find_loss_outliers(base, 100)] == [(4, "a")]


def test_too_few_peers_and_non_finite_values_give_no_verdict():
    # two layers: one peer only, below min_peers, whatever the gap
    assert find_loss_outliers([(0, {"a": 1.0}), (1, {"a": 1e9})]) == []
    assert [e["layer"] for e in find_loss_outliers([(0, {"a": 1.0}), (1, {"a": 1e9})], min_peers=1)] == [1]
    # NaN is neither judged nor a peer; zero medians (exactly representable weights) give no verdict
    layers = [(i, {"a": 1.0}) for i in range(5)] + [(5, {"a": math.nan}), (6, {"a": 1e4})]
    assert [e["layer"] for e in find_loss_outliers(layers)] == [6]
    assert find_loss_outliers([(i, {"a": 0.0}) for i in range(5)] + [(5, {"a": 1.0})]) == []


def test_line_names_module_setting_and_remedy():
    found = [{"layer": 3, "name": "mlp.down_proj", "value": 1.3e7, "median": 200.0, "ratio": 65000.0}]
    line = outlier_line(found, "model.layers", "rsq", "none")
    assert "\n" not in line
    assert "model.layers.3.mlp.down_proj (65000x)" in line
    assert "--online-rotations none" in line and "--online-rotations export" in line
    assert "--online-rotations exact" in outlier_line(found, "model.layers", "quarot", "export")
    assert "--method quarot" in outlier_line(found, "model.layers", "gptq", None)


# results.json of the Qwen2-family run of issue 33 (bench/NOTES-importance.md, session 12: Qwen2.5-Coder-1.5B,
# rsq 3-bit --online-rotations none, seed 0, 8 x 256 calibration): every down_proj's relative loss
QWEN_NONE_DOWN_REL = [
    0.0020300399354486486, 0.14366891983632762, 0.09461742283142208, 0.018994249812841684, 0.00016633185183827302,
    0.0018094718155811647, 0.0018634615431007908, 0.0027487310629437088, 0.0026392984253666954, 0.002626568113460638,
    0.002425860440475863, 0.002391884685957533, 0.0025529537007343028, 0.002956726802048246, 0.003053816993973659,
    0.003127335153256921, 0.0029352596148203617, 0.002801894974805784, 0.003671845407358597, 0.0038353422658018925,
    0.003108683186466837, 0.00385039838364466, 0.002788913189900364, 0.0023062347557216405, 0.002945851453429395,
    0.0026625094510417395, 0.483477280369206, 0.001697087666860524,
]  # fmt: skip


def test_relative_rule_flags_the_real_qwen_failure():
    """The broken modules of the real run (relative losses 0.14, 0.095, 0.48 at layers 1, 2, 26; the
    perplexity cost is in the note) and nothing else; the line names them, the setting and both remedies."""
    from rsq.loss_outliers import REL_RATIO

    found = find_loss_outliers(enumerate({"mlp.down_proj": v} for v in QWEN_NONE_DOWN_REL), REL_RATIO)
    assert [e["layer"] for e in found] == [1, 2, 26]
    # oracle: the median of the other 27 (odd count: the middle one after sorting)
    others = sorted(v for i, v in enumerate(QWEN_NONE_DOWN_REL) if i != 26)
    assert found[2]["ratio"] == pytest.approx(QWEN_NONE_DOWN_REL[26] / others[13])
    line = outlier_line(found, "model.layers", "rsq", "none")
    assert "model.layers.26.mlp.down_proj (173x)" in line and "\n" not in line
    assert "--online-rotations export" in line and "--unrotated-outliers keep-float" in line
