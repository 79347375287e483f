"""--unrotated-weights auto (issue 33): which runs it resolves to uniform, and that it is recorded resolved.

The oracle is the rule written out case by case (the decision in bench/NOTES-importance.md, session
13): uniform only for a rotated method (quarot, rsq with rotation) under --online-rotations none at 3
bits or more; weighted for exact/export, for gptq, for rsq without rotation (the paper's ablation),
and at 2 bits. Explicit values are never changed.
"""

import pytest

from rsq.config import RSQConfig, resolve_unrotated, resolve_unrotated_outliers
from rsq.job.ablate import grid_cells
from rsq.recipe import config_from_recipe


def _cfg(method, online="none", bits=3, rotate=None, unrotated=None, kind="uniform", outliers=None, pad=None):
    rotation = {"online": online}
    if pad is not None:
        rotation["pad_mlp"] = pad
    if rotate is not None:
        rotation["enabled"] = rotate
    importance = {} if unrotated is None else {"unrotated": unrotated}
    if outliers is not None:
        importance["unrotated_outliers"] = outliers
    return RSQConfig.for_method(method, grid={"kind": kind, "bits": bits}, rotation=rotation, importance=importance)


# --unrotated-outliers auto (session 14): the loss rule for rotated GPTQ runs (quarot, rsq with
# rotation) under none at every width, off elsewhere
LOSS_RULE = {("rsq", "none", True), ("quarot", "none", True)}

CASES = [
    # (method, online, bits, rotate, expected)
    ("rsq", "none", 3, None, "uniform"),
    ("rsq", "none", 4, None, "uniform"),
    ("rsq", "none", 8, None, "uniform"),
    ("quarot", "none", 3, None, "uniform"),
    ("rsq", "none", 2, None, "weighted"),  # 2 bits: uniform measured worse (SmolLM2, 3 of 3 seeds)
    ("quarot", "none", 2, None, "weighted"),
    ("rsq", "export", 3, None, "weighted"),
    ("rsq", "exact", 3, None, "weighted"),
    ("rsq", "export", 4, None, "weighted"),
    ("quarot", "exact", 4, None, "weighted"),
    ("gptq", "none", 3, None, "weighted"),  # no rotation
    ("rsq", "none", 3, False, "weighted"),  # rsq without rotation: the paper's ablation keeps its weighting
    ("rtn", "none", 3, True, "weighted"),  # QuaRot-RTN: no Hessian, nothing to weight
    ("fp16", "none", 3, None, "weighted"),
]


@pytest.mark.parametrize("method, online, bits, rotate, expected", CASES)
def test_auto_resolves_by_the_rule(method, online, bits, rotate, expected):
    cfg = _cfg(method, online, bits, rotate)
    assert cfg.importance.unrotated == "auto"  # the default
    assert resolve_unrotated(cfg) == expected
    outliers = "keep-float-on-loss" if (method, online, rotate is not False) in LOSS_RULE else "off"
    assert cfg.importance.unrotated_outliers == "auto" and resolve_unrotated_outliers(cfg) == outliers
    done = cfg.resolved()
    assert done.importance.unrotated == expected and done.importance.unrotated_outliers == outliers
    assert done.resolved() is done  # resolving twice changes nothing
    # everything but the two choices and --pad-mlp auto is untouched; auto stays only where it may pad
    # (a rotated, quantizing run under export: the model's width decides there), else it becomes 0
    chosen = {"unrotated": expected, "unrotated_outliers": outliers}
    pad = "auto" if online == "export" and method in ("rsq", "quarot") and rotate is not False else 0
    want = {**cfg.to_dict(), "importance": {**cfg.to_dict()["importance"], **chosen}}
    want["rotation"] = {**want["rotation"], "pad_mlp": pad}
    assert done.to_dict() == want


@pytest.mark.parametrize("value", ["weighted", "uniform"])
@pytest.mark.parametrize("method, online, bits, rotate", [c[:4] for c in CASES])
def test_explicit_values_are_kept(value, method, online, bits, rotate):
    cfg = _cfg(method, online, bits, rotate, unrotated=value)
    assert resolve_unrotated(cfg) == value and cfg.resolved().importance.unrotated == value
    pinned = _cfg(method, online, bits, rotate, unrotated=value, outliers="off", pad=0)
    assert pinned.resolved() is pinned


def test_e8p_at_2_bits_stays_weighted():
    assert resolve_unrotated(_cfg("rsq", "none", 2, kind="e8p")) == "weighted"


def test_ablation_cells_resolve_each_on_their_own():
    """A grid shares one base config: each cell resolves from its own method and rotation, so the
    'rsq-norot' cell (scale without rotate) keeps the weighting while the rotated rsq cell does not."""
    base = _cfg("rsq", "none", 3)
    cells = dict(grid_cells(base, ["gptq", "quarot", "rsq", "rsq-norot"], ["attncon"], [0]))
    got = {name: resolve_unrotated(cfg) for name, cfg in cells.items()}
    assert got == {
        "gptq-s0": "weighted",
        "quarot-s0": "uniform",
        "rsq-attncon-s0": "uniform",
        "rsq-attncon-norot-s0": "weighted",
    }


def test_recorded_config_reads_back_as_the_resolved_choice():
    done = _cfg("rsq", "none", 3).resolved()
    again = RSQConfig.from_dict(done.to_dict())
    assert again == done and again.importance.unrotated == "uniform"
    # a recipe may say auto, and is resolved by the same rule
    recipe = config_from_recipe({"method": "rsq", "rotation": {"online": "none"}, "importance": {"unrotated": "auto"}})
    assert resolve_unrotated(recipe) == "uniform"
