"""rsq export --format compressed-tensors, and rsq generate, on tiny random Llamas.

Oracle for the export: ``rsq.load`` of the source checkpoint. The export is loaded the way a user
would, ``AutoModelForCausalLM.from_pretrained`` (transformers' compressed-tensors quantizer on CPU),
and the logits must agree to 1e-5 relative to the largest logit: both sides dequantize the same
integer codes with the same float32 scales (scale * (q - zero) is one exact integer difference and
one rounding on either side), so the weights are bit-identical and only the float32
matmul/accumulation order may differ (measured: 0 or ~1e-7).

Two transformers routes: ``dequantize=True`` (compressed-tensors' PackedQuantizationCompressor
decompresses each checkpoint module while loading) works for every scheme; the default route
(compressed modules, decompressed at the first forward) is checked for the symmetric schemes only:
with transformers 5.23 + compressed-tensors 0.20 it builds asymmetric zero points unpacked
(out, groups) while the checkpoint holds them packed along the output dim, (out * bits / 32,
groups), as compressed-tensors' own compressor writes them and vLLM reads them, so it
re-initialises them.
"""

from __future__ import annotations

import json

import pytest
import torch

import rsq
from rsq.checkpoint.export import ExportError, export_compressed_tensors
from rsq.cli.main import main
from rsq.config import (
    CalibConfig,
    GridConfig,
    ImportanceConfig,
    RotationConfig,
    RSQConfig,
    SolverConfig,
)
from rsq.io.loading import load_model
from rsq.job.run import run_quantize

TOL = 1e-5  # relative to max |logit|; see the module docstring


@pytest.fixture(scope="module")
def pow2_llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Llama with intermediate size 128: its down_proj Hadamard is Sylvester's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import tiny_config

    out = tmp_path_factory.mktemp("tiny-llama-pow2")
    cfg = tiny_config("llama")
    cfg.intermediate_size = 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.3 * torch.randn_like(p)  # non-trivial norms, as tests/conftest.py's tiny_model
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(out)
    return out


def _quantize(
    model_dir,
    out,
    grid: GridConfig,
    rotation: RotationConfig | None = None,
    act_order: bool = False,
):
    rotation = rotation or RotationConfig(enabled=False)
    cfg = RSQConfig(
        model=str(model_dir),
        method="quarot" if rotation.enabled else "gptq",
        grid=grid,
        solver=SolverConfig(act_order=act_order),
        rotation=rotation,
        importance=ImportanceConfig(strategy="uniform"),
        calib=CalibConfig(nsamples=4, seqlen=64),
        batch_size=4,
    )
    model, tok = load_model(str(model_dir))
    run_quantize(cfg, out, ppl_sources=(), preloaded=(model, tok))
    return model  # the in-memory fake-quantized model


def _from_pretrained(path, dequantize: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, **extra).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel_err(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize(
    "grid,act_order",
    [
        (GridConfig(bits=4, group_size=-1, symmetric=True), False),
        (GridConfig(bits=4, group_size=32, symmetric=False), True),
        (GridConfig(bits=8, group_size=-1, symmetric=True), False),
    ],
    ids=["w4-channel-sym", "w4-g32-asym-actorder", "w8-channel-sym"],
)
def test_export_loads_in_transformers_with_same_logits(tiny_model_dir, tmp_path, grid, act_order):
    ckpt, out = tmp_path / "ckpt", tmp_path / "ct"
    _quantize(tiny_model_dir("llama"), ckpt, grid, act_order=act_order)
    summary = export_compressed_tensors(ckpt, out)
    assert summary["strategy"] == ("channel" if grid.group_size == -1 else "group")

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (grid.bits, grid.symmetric)
    assert qc["ignore"] == ["lm_head"] and not qc["transform_config"]
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".ct.tmp-*"))

    from safetensors.torch import load_file

    ours, theirs = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.down_proj"
    # both pack 32 codes into `bits` int32 words, unsigned (q + 2^(bits-1)), lowest bits first
    assert torch.equal(ours[f"{key}.qweight"], theirs[f"{key}.weight_packed"])

    loaded, _ = rsq.load(ckpt)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = _logits(loaded, ids)
    assert _rel_err(_logits(_from_pretrained(out, dequantize=True), ids), ref) < TOL
    if grid.symmetric:
        assert _rel_err(_logits(_from_pretrained(out), ids), ref) < TOL


def test_rotated_checkpoint_without_online_sites_exports(tiny_model_dir, tmp_path):
    """QuaRot with only fused rotations (R1, per-head v/o) needs nothing at run time."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "ct"
    rotation = RotationConfig(enabled=True, online_down=False, online_value=False)
    _quantize(tiny_model_dir("llama"), ckpt, GridConfig(bits=4), rotation)
    export_compressed_tensors(ckpt, out)
    loaded, _ = rsq.load(ckpt)
    exported = _from_pretrained(out)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    assert _rel_err(_logits(exported, ids), _logits(loaded, ids)) < TOL


def test_sylvester_down_proj_hadamard_exports_as_transform(pow2_llama_dir, tmp_path):
    """A power-of-2 down_proj Hadamard is compressed-tensors' 'hadamard' input transform.
    transformers ignores transform_config on load: the transform is applied with
    compressed-tensors' own API."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    ckpt, out = tmp_path / "ckpt", tmp_path / "ct"
    rotation = RotationConfig(enabled=True, online_value=False)
    _quantize(pow2_llama_dir, ckpt, GridConfig(bits=4, group_size=32), rotation)
    summary = export_compressed_tensors(ckpt, out)
    assert summary["transforms"] == ["mlp.down_proj"]

    tc = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]
    loaded, _ = rsq.load(ckpt)
    exported = _from_pretrained(out)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(2))
    ref = _logits(loaded, ids)
    # without the online Hadamard the exported model computes another function
    assert _rel_err(_logits(exported, ids), ref) > 1e-2
    apply_transform_config(exported, TransformConfig.model_validate(tc))
    assert _rel_err(_logits(exported, ids), ref) < TOL


def test_refuses_checkpoint_without_quantized_linears(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    _quantize(tiny_model_dir("llama"), ckpt, GridConfig(bits=4))
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"].update(method="fp16", modules=[])  # as `rsq quantize --method fp16`
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="no quantized linears"):
        export_compressed_tensors(ckpt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_refuses_online_hadamard_and_cli_exits_2(tiny_model_dir, tmp_path, capsys):
    """QuaRot with --online-rotations exact, tiny Llama: down_proj Hadamard of order 96 = paley1(q=11)⊗sylvester(8)."""
    ckpt = tmp_path / "ckpt"
    _quantize(tiny_model_dir("llama"), ckpt, GridConfig(bits=4), RotationConfig(enabled=True, online="exact"))
    with pytest.raises(ExportError, match=r"online rotation at mlp\.down_proj input \(full, order 96\)"):
        export_compressed_tensors(ckpt, tmp_path / "ct")
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsq: error: online rotation at mlp.down_proj input") and "\n" not in err
    assert not (tmp_path / "ct").exists()


def test_refuses_cross_head_rotation(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    rotation = RotationConfig(
        enabled=True, online="exact", online_down=False
    )  # 4 heads: cross-head Hadamard before o_proj
    _quantize(tiny_model_dir("llama"), ckpt, GridConfig(bits=4), rotation)
    with pytest.raises(ExportError, match=r"online rotation at self_attn\.o_proj input \(cross_head, order 4\)"):
        export_compressed_tensors(ckpt, tmp_path / "ct")


def test_generate_matches_in_memory_greedy(tiny_model_dir, tmp_path, capsys):
    from rsq.cli.cmd_generate import generate

    ckpt = tmp_path / "ckpt"
    model = _quantize(tiny_model_dir("llama"), ckpt, GridConfig(bits=4), RotationConfig(enabled=True))
    loaded, tok = rsq.load(ckpt)
    prompt, n = "The tower is", 12
    new_ids, text = generate(loaded, tok, prompt, max_new_tokens=n, ignore_eos=True)
    assert len(new_ids) == n

    ids = torch.tensor([tok(prompt).input_ids])
    ref = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )[0, ids.shape[1] :].tolist()
    assert new_ids == ref

    expected = tok.decode(ref, skip_special_tokens=True) + "\n"
    for dense in ([], ["--dense"]):  # --dense: packed linears dequantized once, same tokens
        argv = ["generate", str(ckpt), prompt, "--max-new-tokens", str(n), "--ignore-eos", *dense]
        assert main(argv) == 0
        assert capsys.readouterr().out == text + "\n" == expected


def test_compiled_static_cache_generation_matches_eager(tiny_model_dir, tmp_path, capsys):
    """`rsq generate --compile`: static KV cache + torch.compile'd decode step (rsq.generation) gives
    the eager path's greedy tokens; the oracle is the eager dynamic-cache generation of the same
    loaded checkpoint (online block Hadamard, packed 4-bit linears). "aot_eager" replays the traced
    graph op for op, so the tokens must be identical, not merely close."""
    from rsq.cli.cmd_generate import generate

    ckpt = tmp_path / "ckpt"
    _quantize(tiny_model_dir("llama"), ckpt, GridConfig(bits=4), RotationConfig(enabled=True))
    loaded, tok = rsq.load(ckpt)
    prompt, n = "The tower is", 10
    eager, _ = generate(loaded, tok, prompt, max_new_tokens=n, ignore_eos=True)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, _ = generate(
        loaded, tok, prompt, max_new_tokens=n, ignore_eos=True, compile=True, compile_backend="aot_eager"
    )
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled, not run eagerly
    assert compiled == eager and len(eager) == n


@pytest.mark.parametrize("setting", ["export", "none"])
def test_rsq_checkpoint_with_exportable_rotations_exports(tiny_model_dir, tmp_path, setting):
    """--online-rotations export / none: a rotated RSQ checkpoint of the tiny Llama (down_proj
    width 96 = 3·32, no Sylvester Hadamard of that order) exports to compressed-tensors, and the
    exported model with compressed-tensors' own transform API computes rsq.load's logits."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    ckpt, out = tmp_path / "ckpt", tmp_path / "ct"
    cfg = RSQConfig.for_method(
        "rsq",
        model=str(tiny_model_dir("llama")),
        grid={"bits": 4},
        rotation={"online": setting},
        calib={"nsamples": 4, "seqlen": 64},
        batch_size=4,
    )
    model, tok = load_model(cfg.model)
    run_quantize(cfg, ckpt, ppl_sources=(), preloaded=(model, tok))
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["rotation"]["online_setting"] == setting
    summary = export_compressed_tensors(ckpt, out)
    loaded, _ = rsq.load(ckpt)
    exported = _from_pretrained(out)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(3))
    ref = _logits(loaded, ids)
    tc = json.loads((out / "config.json").read_text())["quantization_config"].get("transform_config")
    if setting == "none":
        assert summary["transforms"] == [] and not tc
        assert not any(hasattr(m, "online_rotation") for m in loaded.modules())
    else:
        assert summary["transforms"] == ["mlp.down_proj"]
        assert tc["config_groups"]["rsq_online_hadamard"]["head_dim"] == 32
        assert _rel_err(_logits(exported, ids), ref) > 1e-2  # transformers alone ignores the transform
        apply_transform_config(exported, TransformConfig.model_validate(tc))
    assert _rel_err(_logits(exported, ids), ref) < TOL
    # `rsq eval EXPORT` loads it through transformers (decompressed, transform applied by
    # compressed-tensors): the same perplexity as the source checkpoint, up to float32 summation order
    from rsq.eval.runner import run_eval

    ppl = [
        run_eval(str(d), ("wikitext2",), seqlen=64, max_windows=2, device="cpu")["perplexity"]["wikitext2"]
        for d in (ckpt, out)
    ]
    assert abs(ppl[1] / ppl[0] - 1) < 1e-5, ppl


@pytest.mark.parametrize("block", [48, 96])
def test_non_pow2_export_block_is_a_dense_transform_with_the_stored_matrix(tiny_model_dir, tmp_path, block):
    """--export-block 48 / 96 on the tiny Llama (down_proj width 96): the block Hadamard is rsq's
    paley1(q=11) ⊗ sylvester (not symmetric), exported as a ``random-hadamard`` transform whose
    matrix is stored. Checked with compressed-tensors' own code: transformers ignores the
    transform_config (no transform module, logits wrong); ``apply_transform_config`` builds a
    random-signed matrix (logits still wrong); loading the stored tensor into it (load_state_dict,
    as a loader that attaches the transforms before the weights would) gives rsq.load's logits to
    TOL, and the transposed matrix does not (the orientation is tested, not assumed). rsq's own
    reader of exports (load_model: decompress, attach, overwrite) gives the checkpoint's perplexity."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase
    from safetensors.torch import load_file

    from rsq.rotation.hadamard import hadamard_matrix

    H = hadamard_matrix(block)
    assert not torch.equal(H, H.T)  # else H vs Hᵀ would not be tested
    ckpt, out = tmp_path / "ckpt", tmp_path / "ct"
    rotation = RotationConfig(enabled=True, online_value=False, export_block=block)
    _quantize(tiny_model_dir("llama"), ckpt, GridConfig(bits=4, group_size=32), rotation)
    site = json.loads((ckpt / "config.json").read_text())["quantization_config"]["rotation"]["online"][0]
    assert (site["kind"], site["head_dim"]) == ("block", block)
    summary = export_compressed_tensors(ckpt, out)
    assert summary["transforms"] == ["mlp.down_proj"]

    tc = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]
    scheme = tc["config_groups"]["rsq_online_hadamard"]
    assert (scheme["type"], scheme["head_dim"]) == ("random-hadamard", block)
    key = "model.layers.0.mlp.down_proj.rsq_online_hadamard_input.weight"
    stored = load_file(out / "model.safetensors")[key]
    assert stored.dtype == torch.float32 and torch.equal(stored, H.T.float())  # ±1: exact in float32

    loaded, _ = rsq.load(ckpt)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(4))
    ref = _logits(loaded, ids)
    exported = _from_pretrained(out)
    assert not any(isinstance(m, TransformBase) for m in exported.modules())  # transformers ignored it
    assert _rel_err(_logits(exported, ids), ref) > 1e-2
    apply_transform_config(exported, TransformConfig.model_validate(tc))
    attached = [m for m in exported.modules() if isinstance(m, TransformBase)]
    assert len(attached) == 2  # one per layer
    assert not torch.equal(attached[0].weight.detach(), stored)  # compressed-tensors' random signs
    assert _rel_err(_logits(exported, ids), ref) > 1e-2
    missing, unexpected = exported.load_state_dict({key: stored}, strict=False)
    assert not unexpected
    # the layers share one matrix (compressed-tensors caches it per order), so one stored copy sets all
    assert all(torch.equal(m.weight.detach(), stored) for m in attached)
    assert _rel_err(_logits(exported, ids), ref) < TOL
    exported.load_state_dict({key: stored.T.contiguous()}, strict=False)  # the wrong orientation
    assert _rel_err(_logits(exported, ids), ref) > 1e-2

    # rsq's reader of exports (rsq eval EXPORT): compressed-tensors decompresses, attaches, and the
    # stored matrix replaces its random one
    via_loader, _ = load_model(str(out))
    assert _rel_err(_logits(via_loader, ids), ref) < TOL
    if block == 48:  # the same where transformers' decompression offloads every module (5.17's route,
        # tests/integration/test_ct_offload.py): the stored matrix must still reach the transforms
        import transformers
        from compressed_tensors.offload import from_accelerate

        real = transformers.AutoModelForCausalLM.from_pretrained.__func__

        def as_in_5_17(cls, *args, **kw):
            net = real(cls, *args, **kw)
            from_accelerate(net)
            return net

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(as_in_5_17))
            offloaded, _ = load_model(str(out))
        assert _rel_err(_logits(offloaded, ids), ref) < TOL
    card = (out / "README.md").read_text()
    assert f"dense {block} x {block} GEMM" in card and "Hadacore" not in card
    # the GPTQ layout runs plain linears: refused as for any online rotation, nothing written
    from rsq.checkpoint.exporters import export

    with pytest.raises(ExportError, match="re-quantize with --online-rotations none"):
        export(ckpt, tmp_path / "gptq", "gptq")
    assert not (tmp_path / "gptq").exists()


def test_block_order_compressed_tensors_cannot_build_is_refused():
    """A block of order 276 (rsq: a core of order 276; compressed-tensors' table has cores up to 256)
    would export, but no compressed-tensors loader could attach it: refused in one line. 768 and
    Qwen2.5-1.5B's 1792 / 8960 (cores 12, 28, 140) pass, as does any power of two."""
    from rsq.checkpoint.export import check_sites
    from rsq.rotation.hadamard import has_hadamard

    def qc(width, block):
        site = {"module": "mlp.down_proj", "kind": "block", "size": width, "head_dim": block, "seed": 0}
        return {"rotation": {"online": [site]}}

    assert has_hadamard(276)
    with pytest.raises(ExportError, match=r"cannot build a random-hadamard transform of order 276") as err:
        check_sites(qc(552, 276))
    assert "\n" not in str(err.value) and "--export-block" in str(err.value)
    for width, block in ((1536, 768), (8960, 1792), (8960, 8960), (8960, 256)):
        check_sites(qc(width, block))
