"""--unrotated-weights (issue 33): which Hessians take the token weights, on a tiny llama.

The option's promise: under ``uniform`` the down_proj of a layer whose down_proj input has no
online rotation (``--online-rotations none``) is solved with the unweighted Hessian, every other
linear keeps the strategy's weights; where the down_proj input is rotated (``export``) nothing
changes, bit for bit.
"""

import pytest
import torch
from safetensors.torch import load_file

from rsq.config import RSQConfig
from rsq.job import stages
from rsq.job.run import run_quantize


def _cfg(model_dir, online: str, unrotated: str) -> RSQConfig:
    return RSQConfig.for_method(
        "rsq",
        model=str(model_dir),
        grid={"bits": 3},
        calib={"nsamples": 4, "seqlen": 64},
        rotation={"online": online},
        importance={"unrotated": unrotated},
        batch_size=2,
    )


def _run(cfg, out, monkeypatch) -> list[tuple[tuple[str, ...], bool]]:
    """Quantize; return (group, weighted?) for every Hessian the job built."""
    seen = []
    real = stages.QuantizeLayer._hessian

    def spy(self, group, layer, passes, weights, *rest):
        seen.append((tuple(group), weights is not None))
        return real(self, group, layer, passes, weights, *rest)

    monkeypatch.setattr(stages.QuantizeLayer, "_hessian", spy)
    run_quantize(cfg, out, ppl_sources=())
    return seen


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
