"""--pad-mlp (rsq/rotation/pad.py): zero-padding the MLP width before the rotation.

Oracles: the unpadded, unrotated model's logits (padding + rotation is function-preserving); exact
zeros for the padded rows; the in-memory job for the streamed one (same checkpoint bit for bit);
``rsq.load`` of the checkpoint for its compressed-tensors export (compressed-tensors' own transform API).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rsq
from rsq.cli.main import main
from rsq.config import RotationConfig, RSQConfig
from rsq.errors import ConfigError
from rsq.io.loading import load_model
from rsq.job.run import run_quantize
from rsq.models.registry import resolve
from rsq.rotation import rotate_model
from rsq.rotation.pad import MlpPadding, pad_layer, padded_width
from tests.conftest import tiny_model
from tests.integration.test_bad_inputs import FAST, _nothing_created, _one_error
from tests.integration.test_export import TOL, _from_pretrained, _logits, _rel_err
from tests.integration.test_rotation import _exact_norms
from tests.integration.test_streaming import (  # noqa: F401 (model_dirs: a fixture)
    _assert_same_checkpoint,
    model_dirs,
    streamed_equals_in_memory,
)


def test_padded_width():
    assert padded_width(96, 0) == 96
    assert padded_width(96, 128) == 128
    # auto: the next multiple of 1024 where the power-of-two block is below 1024 and the growth <= 1/16
    assert padded_width(4864, "auto") == 5120  # Qwen2.5-0.5B: 19 x 256 -> 5 x 1024 (+5.3 %)
    assert padded_width(8960, "auto") == 9216  # Qwen2.5-1.5B: 35 x 256 -> 9 x 1024 (+2.9 %)
    assert padded_width(18944, "auto") == 19456  # Qwen2.5-7B: 37 x 512 -> 19 x 1024 (+2.7 %)
    assert padded_width(29568, "auto") == 29696  # Qwen2.5-72B: 231 x 128 (+0.4 %)
    assert padded_width(1536, "auto") == 1536  # SmolLM2: 3 x 512, but 2048 would be +33 %
    assert padded_width(96, "auto") == 96  # the tiny models: 1024 would more than double them
    assert padded_width(14336, "auto") == 14336  # Llama-3-8B / Mistral: 7 x 2048 already
    assert padded_width(27648, "auto") == 27648  # Qwen2.5-32B: 27 x 1024
    assert padded_width(2048, "auto") == 2048  # a power of two stays
    # the growth limit, on both sides of it: 1024 - 964 = 60 <= 964 / 16; 1024 - 963 = 61 > 963 / 16
    assert padded_width(964, "auto") == 1024 and padded_width(963, "auto") == 963
    # only under export with the automatic block
    for rot in (
        RotationConfig(enabled=True, online="exact"),
        RotationConfig(enabled=True, online="none"),
        RotationConfig(enabled=True, export_block=1792),
        RotationConfig(enabled=False),
    ):
        assert padded_width(8960, "auto", rot) == 8960
    assert padded_width(8960, "auto", RotationConfig(enabled=True)) == 9216
    with pytest.raises(ConfigError, match="--pad-mlp 64 is smaller than the MLP width 96"):
        padded_width(96, 64)


@pytest.mark.parametrize("family,pad,block", [("llama", 128, 128), ("qwen2", 160, 32), ("mistral", 128, 128)])
@pytest.mark.parametrize("setting", ["export", "exact"])
def test_padding_and_rotation_keep_the_function(family, pad, block, setting):
    ref = tiny_model(family, dtype=torch.float64)
    rot = copy.deepcopy(ref)
    _exact_norms(ref), _exact_norms(rot)
    width = ref.config.intermediate_size
    record = rotate_model(rot, resolve(rot), RotationConfig(enabled=True, online=setting, pad_mlp=pad))
    padded = padded_width(width, pad)
    if padded == width:  # mistral's 128 is already that width: nothing added, nothing recorded
        assert "mlp_padding" not in record and rot.config.intermediate_size == width
    else:
        assert record["mlp_padding"]["original_width"] == width
        assert record["mlp_padding"]["padded_width"] == padded == rot.config.intermediate_size
    down = [r for r in record["online"] if r["module"] == "mlp.down_proj"][0]
    assert down["size"] == padded
    if setting == "export":
        assert down["kind"] == "block" and down["head_dim"] == block
    for layer in rot.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (padded, rot.config.hidden_size)
        assert layer.mlp.down_proj.in_features == layer.mlp.down_proj.weight.shape[1] == padded
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, rot(input_ids=ids).logits
    # float64 rounding of a few products of width <= 256 only (the padding itself adds exact zeros)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-10


def test_pad_layer_adds_exact_zeros_and_keeps_the_modules():
    model = tiny_model("qwen2", dtype=torch.float32)
    adapter, layer = resolve(model), model.model.layers[0]
    mlp = layer.mlp
    gate, down = mlp.gate_proj, mlp.down_proj
    gate.bias = torch.nn.Parameter(torch.randn(gate.out_features), requires_grad=False)  # a biased MLP
    before = {n: p.clone() for n, p in mlp.named_parameters()}
    pad_layer(layer, adapter, MlpPadding(152, 160))
    assert mlp.gate_proj is gate and mlp.down_proj is down
    assert torch.equal(gate.weight[:152], before["gate_proj.weight"]) and not gate.weight[152:].any()
    assert torch.equal(gate.bias[:152], before["gate_proj.bias"]) and not gate.bias[152:].any()
    assert torch.equal(down.weight[:, :152], before["down_proj.weight"]) and not down.weight[:, 152:].any()
    x = torch.randn(3, 56)
    with torch.no_grad():
        inner = mlp.act_fn(gate(x)) * mlp.up_proj(x)
    assert not inner[:, 152:].any()  # act(0) * 0: the padded features are exactly zero
    with pytest.raises(RuntimeError, match="padded twice"):
        pad_layer(layer, adapter, MlpPadding(152, 160))


def test_config_refusals():
    with pytest.raises(ConfigError, match="under none"):
        RotationConfig(enabled=True, online="none", pad_mlp=128)
    with pytest.raises(ConfigError, match="must be 0 .off., auto or an MLP width"):
        RotationConfig(enabled=True, pad_mlp=-1)
    with pytest.raises(ConfigError, match="does not rotate"):
        RSQConfig.for_method("gptq", rotation={"pad_mlp": 128})
    cfg = RSQConfig.for_method("rsq", rotation={"pad_mlp": "auto"})
    assert RSQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # recorded and read back
    # the default is never refused where an explicit width is: it resolves to 0 there
    for method, kw in (
        ("gptq", {}),
        ("rsq", {"grid": {"kind": "e8p", "bits": 2}}),
        ("rsq", {"rotation": {"online": "none"}}),
    ):
        default = RSQConfig.for_method(method, **kw)
        assert default.rotation.pad_mlp == "auto" and default.resolved().rotation.pad_mlp == 0


@pytest.mark.parametrize(
    "args,needles",
    [
        (("--pad-mlp", "64"), ("--pad-mlp 64 is smaller than the MLP width 96",)),
        (("--method", "gptq", "--pad-mlp", "128"), ("--pad-mlp 128", "does not rotate")),
        (("--online-rotations", "none", "--pad-mlp", "128"), ("--pad-mlp 128", "drop --pad-mlp")),
        (("--pad-mlp", "wide"), ("--pad-mlp 'wide' must be 0 (off), auto or an MLP width",)),
    ],
)
def test_cli_refusals_exit_2_with_one_line(tiny_model_dir, tmp_path, capsys, args, needles):
    llama = str(tiny_model_dir("llama"))
    capsys.readouterr()
    rc = main(["quantize", llama, "--bits", "3", "--out", str(tmp_path / "o"), *FAST, *args])
    _one_error(capsys, rc, *needles)
    _nothing_created(tmp_path)


def test_streamed_equals_in_memory_with_padding(model_dirs, tmp_path):  # noqa: F811
    """The tiny Qwen2 (width 152, q/k/v biases) padded to 256, streamed from 3 shards vs in memory."""
    family, pad = "qwen2", 256
    cfg = RSQConfig.for_method(
        "rsq",
        model=str(model_dirs(family)),
        grid={"bits": 3},
        rotation={"pad_mlp": pad},
        calib={"nsamples": 4, "seqlen": 32},
        batch_size=3,
    )
    mem, _ = streamed_equals_in_memory(cfg, tmp_path, windows=3)
    for out in ("mem", "st"):
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert config["intermediate_size"] == pad
        assert config["quantization_config"]["rotation"]["mlp_padding"]["padded_width"] == pad
    assert mem["rotation"]["mlp_padding"]["original_width"] == resolve_width(family)


def test_padded_run_killed_and_resumed_equals_uninterrupted(model_dirs, tmp_path):  # noqa: F811
    """Killed after layer 0 while streamed, resumed in memory: the finished layer's saved (padded)
    codes are restored into the padded, rotated layer; the checkpoint equals an uninterrupted run's."""
    from rsq.job.run import _Interrupted

    cfg = RSQConfig.for_method(
        "quarot",
        model=str(model_dirs("qwen2")),
        grid={"bits": 3},
        rotation={"pad_mlp": 256},
        calib={"nsamples": 4, "seqlen": 32},
        batch_size=3,
    )
    run_quantize(cfg, tmp_path / "full", ppl_sources=())
    out = tmp_path / "out"
    with pytest.raises(_Interrupted):
        run_quantize(cfg, out, ppl_sources=(), stop_after_layer=0)
    run_quantize(cfg, out, ppl_sources=(), resume=True, stream=False)
    _assert_same_checkpoint(tmp_path / "full", out)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 256  # 152 -> 256


@pytest.mark.parametrize("setting", ["export", "exact"])
def test_default_pads_a_qwen_like_width_under_export_only(tiny_model_dir, tmp_path, setting):
    """The default --pad-mlp auto on a tiny Llama whose MLP is 1000 = 125 x 8 wide (export's blocks
    would be 8 wide, like Qwen2.5-1.5B's 8960 = 35 x 256): under export the run pads it to 1024 (one
    block of 1024, +2.4 %) and records that; under exact it pads nothing and records pad_mlp 0 (that
    padding preserves the function is test_padding_and_rotation_keep_the_function's)."""
    from transformers import AutoModelForCausalLM

    model, tok = load_model(str(tiny_model_dir("llama")))
    config = copy.deepcopy(model.config)
    config.intermediate_size = 1000
    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    cfg = RSQConfig.for_method(
        "rsq",
        model=str(tiny_model_dir("llama")),
        grid={"bits": 4},
        rotation={"online": setting},
        calib={"nsamples": 4, "seqlen": 32},
        batch_size=4,
    )
    assert cfg.rotation.pad_mlp == "auto"  # the default
    results = run_quantize(cfg, tmp_path / "q", ppl_sources=(), preloaded=(wide, tok))
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    if setting == "export":
        assert results["rotation"]["mlp_padding"] == {
            "original_width": 1000,
            "padded_width": 1024,
            "weight_growth": 24 / 1000,
        }
        assert saved["intermediate_size"] == 1024
        assert results["config"]["rotation"]["pad_mlp"] == "auto"  # the width decided; mlp_padding says how
        for layer in wide.model.layers:  # the padded gate/up rows quantized to exact zeros
            assert layer.mlp.up_proj.weight.shape[0] == 1024 and not layer.mlp.up_proj.weight[1000:].any()
    else:
        assert "mlp_padding" not in results["rotation"]
        assert saved["intermediate_size"] == 1000
        assert results["config"]["rotation"]["pad_mlp"] == 0  # resolved before the run: exact never pads


def resolve_width(family: str) -> int:
    from tests.conftest import TINY

    return TINY[family]["intermediate_size"]


def test_padded_checkpoint_exports_and_quantizes_padding_to_zero(tiny_model_dir, tmp_path):
    """Tiny Llama, width 96 = 3 x 32 padded to 128: one Sylvester block of 128. The checkpoint's
    padded gate/up rows are zero codes (exact zeros dequantized), rsq.load and the compressed-tensors
    export (with compressed-tensors' transform API) compute the same logits, and the export is an
    ordinary model with intermediate_size 128."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    from rsq.checkpoint.export import export_compressed_tensors

    ckpt, out = tmp_path / "ckpt", tmp_path / "ct"
    cfg = RSQConfig.for_method(
        "rsq",
        model=str(tiny_model_dir("llama")),
        grid={"bits": 4},
        rotation={"pad_mlp": 128},
        calib={"nsamples": 4, "seqlen": 64},
        batch_size=4,
    )
    model, tok = load_model(cfg.model)
    results = run_quantize(cfg, ckpt, ppl_sources=(), preloaded=(model, tok))
    assert results["rotation"]["mlp_padding"] == {"original_width": 96, "padded_width": 128, "weight_growth": 1 / 3}
    for layer in model.model.layers:  # the in-memory fake-quantized model: padded rows stay exactly zero
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            assert lin.weight.shape[0] == 128 and not lin.weight[96:].any() and lin.weight[:96].any()
        assert layer.mlp.down_proj.weight[:, 96:].any()  # rotated: the padded columns are mixed in
    loaded, _ = rsq.load(ckpt)
    assert loaded.config.intermediate_size == 128
    assert not loaded.model.layers[0].mlp.up_proj.dequantize_weight()[96:].any()
    summary = export_compressed_tensors(ckpt, out)
    assert summary["transforms"] == ["mlp.down_proj"]
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 128
    assert "MLP zero-padded from 96 to 128 features" in (out / "README.md").read_text()  # the model card
    tc = config["quantization_config"]["transform_config"]
    assert tc["config_groups"]["rsq_online_hadamard"]["head_dim"] == 128
    exported = _from_pretrained(out)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(4))
    ref = _logits(loaded, ids)
    apply_transform_config(exported, TransformConfig.model_validate(tc))
    assert _rel_err(_logits(exported, ids), ref) < TOL


GRIDS = [
    dict(bits=3),
    dict(bits=3, symmetric=False),
    dict(bits=3, symmetric=False, mse_clip=False),
    dict(bits=4, group_size=16),
    dict(bits=4, group_size=16, symmetric=False),
    dict(kind="nf", bits=3),
    dict(kind="nf", bits=4, group_size=16),
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_zero_rows_quantize_to_exact_zeros(grid):
    """The padded gate/up rows: RTN and GPTQ (natural and act order, rows stacked as gate+up are)
    give exact zeros, finite scales, and the stored codes dequantize to zeros too."""
    from rsq.checkpoint.schema import dequantize_result
    from rsq.config import GridConfig, SolverConfig
    from rsq.solver.gptq import gptq_quantize, rtn_result

    grid = GridConfig(**grid)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g)
    W[16:] = 0
    X = torch.randn(256, 64, generator=g)
    H = X.T @ X / 256
    results = [rtn_result(W, grid)] + [gptq_quantize(W, H, grid, SolverConfig(act_order=a)) for a in (False, True)]
    for res in results:
        assert torch.isfinite(res.scale).all() and torch.isfinite(res.weight).all()
        assert not res.weight[16:].any() and res.weight[:16].any()
        assert not dequantize_result(res, grid)[16:].any()


def test_e8p_refuses_padding():
    """E8P's codebook has no zero point: a zero row quantizes to nonzero values (checked here), so the
    padding would not be function-preserving; the config refuses it."""
    from rsq.config import GridConfig, SolverConfig
    from rsq.solver.ldlq import ldlq_quantize

    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    W[8:] = 0
    assert ldlq_quantize(W, torch.eye(64), GridConfig(kind="e8p", bits=2), SolverConfig()).weight[8:].any()
    with pytest.raises(ConfigError, match="--pad-mlp with the e8p grid"):
        RSQConfig.for_method("rsq", grid={"kind": "e8p"}, rotation={"pad_mlp": 128})


def test_preflight_checks_the_padded_width():
    """Before any weight is read: a width below the MLP's is refused, and the group size is checked
    against the padded down_proj width (96 is not a multiple of 64, 128 is)."""
    from rsq.plan.preflight import check_model
    from tests.conftest import tiny_config

    config = tiny_config("llama")
    with pytest.raises(ConfigError, match="--group-size 64 does not divide the input widths 96"):
        check_model(config, RSQConfig.for_method("rsq", grid={"group_size": 64}), ppl_seqlen=None)
    check_model(
        config, RSQConfig.for_method("rsq", grid={"group_size": 64}, rotation={"pad_mlp": 128}), ppl_seqlen=None
    )
    with pytest.raises(ConfigError, match="--pad-mlp 80 is smaller than the MLP width 96"):
        check_model(config, RSQConfig.for_method("rsq", rotation={"pad_mlp": 80}), ppl_seqlen=None)
    assert config.intermediate_size == 96  # the source's config is left as it is


def test_unquantized_rotated_padded_run_keeps_the_perplexity(tiny_model_dir, tmp_path, capsys):
    """`--method fp16 --rotate --pad-mlp 128` rotates the whole model at once (no layer loop): the
    same perplexity as the plain model, up to float32 rounding of the rotated weights, and a saved
    config with the padded width."""
    llama = str(tiny_model_dir("llama"))
    runs = {}
    for name, extra in (("plain", ()), ("padded", ("--rotate", "--pad-mlp", "128"))):
        argv = ["quantize", llama, "--method", "fp16", "--out", str(tmp_path / name), *FAST, *extra]
        assert main(argv) == 0
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    capsys.readouterr()
    a, b = (runs[n]["perplexity"]["wikitext2"] for n in ("plain", "padded"))
    assert abs(b / a - 1) < 1e-4, (a, b)  # float32 rotated weights: ~1e-6 relative logits (test_rotation)
    assert runs["padded"]["rotation"]["mlp_padding"]["padded_width"] == 128
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["intermediate_size"] == 128


def test_auto_pads_only_a_gated_mlp_and_an_explicit_width_refuses_others():
    """The default never stops a run: on an MLP that zero padding cannot preserve (here a tiny Llama
    whose MLP lost its act_fn) "auto" pads nothing, while an explicit width is refused in one line."""
    from transformers import AutoModelForCausalLM

    from rsq.rotation.pad import plan_padding
    from tests.conftest import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 1000  # 125 x 8: auto pads it to 1024 under export
    model = AutoModelForCausalLM.from_config(config)
    adapter = resolve(model)
    assert plan_padding(model, adapter, 1000, RotationConfig(enabled=True)) == MlpPadding(1000, 1024)
    del model.model.layers[0].mlp.act_fn
    assert plan_padding(model, adapter, 1000, RotationConfig(enabled=True)) is None
    with pytest.raises(ConfigError, match="needs a gated MLP"):
        plan_padding(model, adapter, 1000, RotationConfig(enabled=True, pad_mlp=1024))


def test_rsq_plan_plans_the_padded_mlp(capsys):
    """`rsq plan` predicts the memory of what `rsq quantize --method rsq` runs: Qwen2.5-7B's MLP
    padded 18944 -> 19456 under the default (the down_proj Hessian and the kept MLP inputs grow with
    it), Llama-3-8B's 14336 left as is; `--pad-mlp 0` plans the original width."""

    def plan(*argv):
        assert main(["plan", *argv]) == 0
        return capsys.readouterr().out

    def figure(out, key):
        return float(next(line for line in out.splitlines() if line.strip().startswith(key)).split()[-1])

    padded, plain = plan("qwen2.5-7b"), plan("qwen2.5-7b", "--pad-mlp", "0")
    assert "intermediate 19456 (padded from 18944 by --pad-mlp)" in padded
    assert "intermediate 18944," in plain and "padded" not in plain
    key = "down_inputs_if_kept_GiB"
    assert figure(padded, key) == pytest.approx(figure(plain, key) * 19456 / 18944, rel=1e-3)  # 2 decimals
    assert "intermediate 14336, " in plan("llama-3-8b")
    assert main(["plan", "qwen2.5-7b", "--pad-mlp", "100"]) == 2
    assert "--pad-mlp 100 is smaller than the MLP width 18944" in capsys.readouterr().err
