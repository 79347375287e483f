"""--unrotated-weights (issue 33): which Hessians take the token weights, on a tiny llama.

The option's promise: under ``uniform`` the down_proj of a layer whose down_proj input has no
online rotation (``--online-rotations none``) is solved with the unweighted Hessian, every other
linear keeps the strategy's weights; where the down_proj input is rotated (``export``) nothing
changes, bit for bit.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from rsq.config import RSQConfig
from rsq.job import stages
from rsq.job.run import run_quantize


def _cfg(model_dir, online: str, unrotated: str | None, rotate: bool = True) -> RSQConfig:
    """rsq at 3 bits; ``unrotated`` None leaves --unrotated-weights at its default (auto)."""
    return RSQConfig.for_method(
        "rsq",
        model=str(model_dir),
        grid={"bits": 3},
        calib={"nsamples": 4, "seqlen": 64},
        rotation={"online": online, "enabled": rotate},
        importance={} if unrotated is None else {"unrotated": unrotated},
        batch_size=2,
    )


_HESSIAN = stages.QuantizeLayer._hessian


def _run(cfg, out, monkeypatch, results: list | None = None) -> list[tuple[tuple[str, ...], bool]]:
    """Quantize; return (group, weighted?) for every Hessian the job built (results.json's dict is
    appended to ``results`` when given)."""
    seen = []
    real = _HESSIAN  # the unwrapped method: a second _run must not feed the first one's list

    def spy(self, group, layer, passes, weights, *rest):
        seen.append((tuple(group), weights is not None))
        return real(self, group, layer, passes, weights, *rest)

    monkeypatch.setattr(stages.QuantizeLayer, "_hessian", spy)
    done = run_quantize(cfg, out, ppl_sources=())
    if results is not None:
        results.append(done)
    return seen


def _recorded(out) -> tuple[str, str, str]:
    """--unrotated-weights as results.json, the checkpoint's config.json and state say it."""
    results = json.loads((out / "results.json").read_text())["config"]["importance"]["unrotated"]
    checkpoint = json.loads((out / "config.json").read_text())["quantization_config"]["rsq_config"]
    return results, checkpoint["importance"]["unrotated"], RSQConfig.from_dict(checkpoint).importance.unrotated


def _tensors(out):
    return {
        f"{f.name}:{k}": v
        for f in sorted(out.glob("*.safetensors"))
        if f.name != "importance.safetensors"
        for k, v in load_file(str(f)).items()
    }


def test_uniform_down_proj_only_where_its_input_is_not_rotated(tiny_model_dir, tmp_path, monkeypatch):
    model = tiny_model_dir("llama")
    seen = _run(_cfg(model, "none", "uniform"), tmp_path / "none-uniform", monkeypatch)
    down = ("mlp.down_proj",)
    assert len(seen) == 2 * 4  # 2 layers x (qkv, o, up+gate, down)
    assert [w for g, w in seen if g == down] == [False, False]
    assert all(w for g, w in seen if g != down)

    weighted = _run(_cfg(model, "none", "weighted"), tmp_path / "none-weighted", monkeypatch)
    assert all(w for _, w in weighted)
    a, b = _tensors(tmp_path / "none-uniform"), _tensors(tmp_path / "none-weighted")
    assert a.keys() == b.keys()
    # layer 0 up to its down_proj saw the same inputs and weights: identical codes; its down_proj not
    same = [k for k in a if ".layers.0." in k and "down_proj" not in k and "weight" in k]
    assert same and all(torch.equal(a[k], b[k]) for k in same)
    down0 = [k for k in a if ".layers.0.mlp.down_proj" in k]
    assert down0 and any(not torch.equal(a[k], b[k]) for k in down0)


@pytest.mark.parametrize("online", ["export", "exact"])
def test_rotated_down_proj_keeps_its_weights_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch, online):
    model = tiny_model_dir("llama")
    seen = _run(_cfg(model, online, "uniform"), tmp_path / "uniform", monkeypatch)
    assert len(seen) == 8 and all(w for _, w in seen)
    _run(_cfg(model, online, "weighted"), tmp_path / "weighted", monkeypatch)
    a, b = _tensors(tmp_path / "uniform"), _tensors(tmp_path / "weighted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "flags, needle",
    [(["--importance-cap", "0.5"], "--importance-cap 0.5"), (["--unrotated-weights", "some"], "--unrotated-weights")],
)
def test_bad_values_fail_in_one_line_before_any_work(tiny_model_dir, tmp_path, capsys, flags, needle):
    from rsq.cli.main import main

    out, model = tmp_path / "o", str(tiny_model_dir("llama"))
    capsys.readouterr()  # the fixture's own output (saving the tiny model)
    assert main(["quantize", model, *flags, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[-1], err
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_default_is_uniform_only_for_rotated_rsq_under_none_and_recorded_resolved(
    tiny_model_dir, tmp_path, monkeypatch
):
    """--unrotated-weights auto (the default): rsq with rotation under none solves the down_proj with
    the unweighted Hessian and records "uniform"; rsq without rotation (the paper's "scale without
    rotate") keeps every Hessian weighted and records "weighted"."""
    model = tiny_model_dir("llama")
    down = ("mlp.down_proj",)
    seen = _run(_cfg(model, "none", None), tmp_path / "auto", monkeypatch)
    assert [w for g, w in seen if g == down] == [False, False] and all(w for g, w in seen if g != down)
    assert _recorded(tmp_path / "auto") == ("uniform",) * 3
    explicit = _run(_cfg(model, "none", "uniform"), tmp_path / "uniform", monkeypatch)
    assert explicit == seen
    a, b = _tensors(tmp_path / "auto"), _tensors(tmp_path / "uniform")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    norot = _run(_cfg(model, "none", None, rotate=False), tmp_path / "norot", monkeypatch)
    assert len(norot) == 8 and all(w for _, w in norot)
    assert _recorded(tmp_path / "norot") == ("weighted",) * 3


@pytest.mark.parametrize("online", ["export", "exact"])
def test_default_under_rotated_settings_is_weighted_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch, online):
    """exact/export: the default runs exactly as the explicit "weighted" did before auto existed:
    every tensor, the recorded config and the module losses equal."""
    model = tiny_model_dir("llama")
    got, want = [], []
    _run(_cfg(model, online, None), tmp_path / "auto", monkeypatch, got)
    _run(_cfg(model, online, "weighted"), tmp_path / "weighted", monkeypatch, want)
    a, b = _tensors(tmp_path / "auto"), _tensors(tmp_path / "weighted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got[0]["config"] == want[0]["config"]
    assert _recorded(tmp_path / "auto") == ("weighted",) * 3
    losses = [[layer["losses"] for layer in r["layers"]] for r in (got[0], want[0])]
    assert losses[0] == losses[1]
