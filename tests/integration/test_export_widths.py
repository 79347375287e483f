"""`rsq export --format compressed-tensors` at 2, 3, 4 and 8 bits, with the ``--online-rotations
export`` down_proj block Hadamard carried as compressed-tensors' ``hadamard`` transform; the
exporter registry's refusals.

Two oracles that share no code with rsq's packer:

* compressed-tensors itself: transformers loads the export with ``CompressedTensorsConfig(
  dequantize=True)`` (compressed-tensors' ``PackedQuantizationCompressor.decompress`` unpacks every
  linear) and compressed-tensors' ``apply_transform_config`` attaches the online Hadamard; its
  logits must equal ``rsq.load``'s to TOL. Both sides dequantize the same integers with the same
  float32 scales (one exact integer difference, one rounding), so the weights are bit-identical;
  the Hadamard is applied by different code (rsq's fast transform vs compressed-tensors' matrix
  product, both float32), so the outputs differ by float32 summation order only (measured ~1e-7 of
  the largest logit on the tiny Llama; 1e-5 leaves room across machines).
* an unpacker written here from the layout vLLM reads (vLLM 0.32 ``CompressedTensorsWNA16``: the
  packed input width is ceil(in * bits / 32) int32 words per output row; compressed-tensors >= 0.18
  ``pack_to_int32``: each row is one little-endian bit stream, value i in bits [i*b, (i+1)*b),
  stored unsigned as q + 2^(b-1); zero points packed the same way along the output dim). It must
  give rsq's stored codes and zero points exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import rsq
from rsq.checkpoint.exporters import EXPORTERS, export
from rsq.cli.main import main
from rsq.config import RSQConfig
from rsq.errors import ExportError
from rsq.io.loading import load_model
from rsq.job.run import run_quantize
from rsq.quant.pack import unpack_codes

TOL = 1e-5  # relative to max |logit|; see the module docstring


def _stream_unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(rows, n) unsigned values from int32 words (rows, ceil(n * bits / 32)): a row's words are one
    little-endian bit stream (bit j of word w is stream bit 32w + j); value i is stream bits
    [i*bits, (i+1)*bits), least significant first."""
    assert words.dtype == torch.int32 and words.shape[1] == math.ceil(n * bits / 32)
    u = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((u.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(u.shape[0], -1)
    return (stream[:, : n * bits].reshape(-1, n, bits) << torch.arange(bits)).sum(-1)


def _quantize(model_dir, out, bits, group_size=-1, symmetric=True, online="export", method="rsq"):
    cfg = RSQConfig.for_method(
        method,
        model=str(model_dir),
        grid={"bits": bits, "group_size": group_size, "symmetric": symmetric},
        rotation={"online": online} if method in ("quarot", "rsq") else {},
        calib={"nsamples": 4, "seqlen": 64},
        batch_size=4,
    )
    model, tok = load_model(cfg.model)
    run_quantize(cfg, out, ppl_sources=(), preloaded=(model, tok))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel_err(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _decompressed_with_transform(out):
    """The export as compressed-tensors serves it without vLLM: decompressed by its compressor while
    transformers loads it, the online transform attached by compressed-tensors' own API."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    tc = json.loads((out / "config.json").read_text())["quantization_config"].get("transform_config")
    if tc:
        apply_transform_config(model, TransformConfig.model_validate(tc))
    return model.eval()


@pytest.mark.parametrize(
    "bits,group_size,symmetric",
    [(2, 32, True), (3, -1, True), (3, 32, False), (4, 32, False), (8, -1, True)],
    ids=["w2-g32-sym", "w3-channel-sym", "w3-g32-asym", "w4-g32-asym", "w8-channel-sym"],
)
def test_export_setting_checkpoint_round_trips(tiny_model_dir, tmp_path, bits, group_size, symmetric):
    ckpt, out = tmp_path / "ckpt", tmp_path / "ct"
    _quantize(tiny_model_dir("llama"), ckpt, bits, group_size, symmetric)
    summary = export(ckpt, out, "compressed-tensors")
    assert summary["transforms"] == ["mlp.down_proj"] and summary["bits"] == bits

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["type"]) == (bits, symmetric, "int")
    assert weights["strategy"] == ("channel" if group_size == -1 else "group")
    scheme = qc["transform_config"]["config_groups"]["rsq_online_hadamard"]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == 32  # tiny Llama: 96 = 3 blocks of 32

    # the integers, read back by the independent unpacker, are rsq's
    src_qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    ours, theirs = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    for prefix in src_qc["modules"]:
        out_f, in_f = theirs[f"{prefix}.weight_shape"].tolist()
        codes = unpack_codes(ours[f"{prefix}.qweight"], bits, in_f).to(torch.int64)
        assert codes.shape == (out_f, in_f)
        assert torch.equal(_stream_unpack(theirs[f"{prefix}.weight_packed"], bits, in_f), codes), prefix
        assert torch.equal(theirs[f"{prefix}.weight_scale"], ours[f"{prefix}.scales"])
        if symmetric:
            assert f"{prefix}.weight_zero_point" not in theirs
        else:
            zp = theirs[f"{prefix}.weight_zero_point"]  # (ceil(out * bits / 32), groups)
            got = _stream_unpack(zp.T.contiguous(), bits, out_f).T
            assert torch.equal(got, ours[f"{prefix}.qzeros"].to(torch.int64)), prefix

    loaded, _ = rsq.load(ckpt)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(bits))
    ref = _logits(loaded, ids)
    assert _rel_err(_logits(_decompressed_with_transform(out), ids), ref) < TOL


def test_stream_unpacker_reads_compressed_tensors_3bit_straddles():
    """The oracle itself, on values whose 3-bit codes straddle word boundaries (codes 10, 21 of a
    row start at bits 30 and 63): compressed-tensors' packer and the stream reading agree."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-4, 4, (5, 70), generator=g, dtype=torch.int8)
    packed = pack_to_int32(q, 3)
    assert packed.shape == (5, math.ceil(70 * 3 / 32))
    assert torch.equal(_stream_unpack(packed, 3, 70), q.to(torch.int64) + 4)


def _cli_refuses(argv, capsys, out) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return err


def test_bad_exports_fail_with_one_line(tiny_model_dir, tmp_path, capsys):
    """E8P, NormalFloat, the exact setting (SmolLM2-like non-power-of-2 down_proj: the tiny Llama's
    96) into compressed-tensors, the export setting and a 5-bit config into GPTQ: exit 2, one line
    naming what would work, nothing written."""
    model = tiny_model_dir("llama")
    out = tmp_path / "out"

    e8p, nf = tmp_path / "e8p", tmp_path / "nf"
    for path, grid, bits in ((e8p, "e8p", 2), (nf, "nf", 3)):
        cfg = RSQConfig.for_method(
            "gptq", model=str(model), grid={"kind": grid, "bits": bits}, calib={"nsamples": 4, "seqlen": 64}
        )
        m, tok = load_model(cfg.model)
        run_quantize(cfg, path, ppl_sources=(), preloaded=(m, tok))
        for fmt in EXPORTERS:
            err = _cli_refuses(["export", str(path), "--format", fmt, "--out", str(out)], capsys, out)
            assert f"the {grid} grid cannot be exported to {fmt}" in err and "--grid uniform" in err, err

    exact = tmp_path / "exact"
    _quantize(model, exact, 3, online="exact")
    err = _cli_refuses(["export", str(exact), "--format", "compressed-tensors", "--out", str(out)], capsys, out)
    assert "online rotation at mlp.down_proj input (full, order 96)" in err
    assert "--online-rotations export" in err

    block = tmp_path / "block"
    _quantize(model, block, 3, online="export")
    err = _cli_refuses(["export", str(block), "--format", "gptq", "--out", str(out)], capsys, out)
    assert "(--online-rotations export)" in err and "--online-rotations none" in err
    assert "export --format compressed-tensors" in err

    config = json.loads((block / "config.json").read_text())
    config["quantization_config"]["bits"] = 5  # no rsq grid stores 5 bits: a hand-edited or foreign file
    (block / "config.json").write_text(json.dumps(config))
    err = _cli_refuses(["export", str(block), "--format", "gptq", "--out", str(out)], capsys, out)
    assert "5 bits" in err and "re-run rsq quantize" in err, err


def test_registry_refuses_width_and_setting_naming_alternatives():
    """The registry's shared checks, on quantization_configs alone (no checkpoint needed)."""
    from rsq.checkpoint.exporters import Exporter, check_exportable

    base = {"modules": ["model.layers.0.mlp.down_proj"], "grid": "uniform", "bits": 3, "method": "rsq"}
    block = {"module": "mlp.down_proj", "kind": "block", "size": 96, "head_dim": 32}
    rotation = {"online_setting": "export", "online": [block]}
    check_exportable({**base, "rotation": rotation}, "compressed-tensors")  # the case this issue opens
    with pytest.raises(ExportError, match=r"--online-rotations none, or export --format compressed-tensors"):
        check_exportable({**base, "rotation": rotation}, "gptq")
    check_exportable({**base, "rotation": {**rotation, "online": []}}, "gptq")  # none: nothing at run time
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        check_exportable(base, "onnx")

    # a narrower exporter: the width refusal names the widths it holds and the exporters that take 3 bits
    EXPORTERS["narrow"] = Exporter("narrow", bits=(4, 8), settings=("none",), convert="x:y", help="")
    try:
        from rsq.formats import get_format

        fmt = get_format("uniform")
        fmt.exports["narrow"] = None
        with pytest.raises(ExportError) as exc:
            check_exportable(base, "narrow")
        msg = str(exc.value)
        assert "3-bit weights cannot be exported to narrow" in msg and "--bits 4 or 8" in msg
        assert "export --format compressed-tensors / gptq" in msg
    finally:
        del EXPORTERS["narrow"]
        fmt.exports.pop("narrow", None)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3])
def test_smollm2_rotated_export_decompresses_to_rsq_logits(tmp_path, bits):
    """The default model (SmolLM2-135M-Instruct) rotated with the default online setting (export:
    down_proj as blocks of Sylvester's H_512, 1536 = 3 blocks), 2/3 bits, group 64: the export read
    back by compressed-tensors (rsq eval's loader: decompress + apply_transform_config) gives
    rsq.load's logits on WikiText. Round to nearest (rtn with the rotation, no clip search) keeps
    it to seconds; the export sees only the stored integers, scales and rotation record, the same
    for every solver. Tolerance: the weights are bit-identical; 30 layers of float32 matmuls and
    two Hadamard implementations in different summation orders on each side: 1e-4 of the largest
    logit (measured: see bench/NOTES-checkpoints.md), and the same argmax at every position."""
    from rsq.calib.datasets import find_wikitext_files, read_text

    ckpt, out = tmp_path / "ckpt", tmp_path / "ct"
    cfg = RSQConfig.for_method(
        "rtn",
        grid={"bits": bits, "group_size": 64, "mse_clip": False},
        rotation={"enabled": True, "online": "export"},
        calib={"nsamples": 2, "seqlen": 64},
    )
    model, tok = load_model(cfg.model)
    run_quantize(cfg, ckpt, ppl_sources=(), preloaded=(model, tok))
    del model
    summary = export(ckpt, out, "compressed-tensors")
    assert summary["transforms"] == ["mlp.down_proj"] and summary["bits"] == bits
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["transform_config"]["config_groups"]["rsq_online_hadamard"]["head_dim"] == 512

    _, test = find_wikitext_files()
    ids = tok(read_text(test)[:4000], return_tensors="pt").input_ids[:, :256]
    loaded, _ = rsq.load(ckpt)
    ref = _logits(loaded, ids)
    del loaded
    exported, _ = load_model(str(out))
    got = _logits(exported, ids)
    print(f"SmolLM2 {bits}-bit export: max |logit diff| / max |logit| = {_rel_err(got, ref):.2e}")
    assert _rel_err(got, ref) < 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
