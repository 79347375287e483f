"""`rsq export --format gptq`, checked with code that shares nothing with rsq's packer: an unpacker
written here from the GPTQ layout's description (checkpoint_format "gptq": codes packed along the
input dim as one little-endian bit string per output column, zero points stored minus one), and a
plain float transformers model built from what it unpacks."""

import json

import pytest
import torch
from safetensors.torch import load_file

import rsq
from rsq.checkpoint.export_gptq import export_gptq
from rsq.cli.main import main
from rsq.config import RSQConfig
from rsq.errors import ExportError
from rsq.io.loading import load_model
from rsq.job.run import run_quantize

# float16 scales (GPTQ's dtype) are the only change: 2^-11 relative per scale, averaging out over
# the 64..96-wide dot products of the tiny model; 5e-3 of the largest logit bounds it with margin
TOL = 5e-3


def _bits_along_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Values (n, cols) from int32 words (n * bits / 32, cols): value k of a column is bits
    [k*bits, (k+1)*bits) of the column's words read as one little-endian bit string."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n, w.shape[1], dtype=torch.int64)
    for k in range(n):
        for b in range(bits):
            pos = k * bits + b
            out[k] |= ((w[pos // 32] >> (pos % 32)) & 1) << b
    return out


def _gptq_weights(tensors: dict, prefix: str, qc: dict, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (out, in) float32, integer codes minus zeros (out, in)) of one exported linear."""
    bits = qc["bits"]
    q = _bits_along_rows(tensors[f"{prefix}.qweight"], bits, in_features)  # (in, out)
    out_features = q.shape[1]
    z = _bits_along_rows(tensors[f"{prefix}.qzeros"].T, bits, out_features).T + 1  # (G, out), v1: stored + 1
    g = tensors[f"{prefix}.g_idx"].long()
    s = tensors[f"{prefix}.scales"].float()  # (G, out)
    centred = q - z[g]  # (in, out)
    return (s[g] * centred.float()).T, centred.T


def _quantize(model_dir, out, method, bits, **grid):
    cfg = RSQConfig.for_method(
        method,
        model=str(model_dir),
        grid={"bits": bits, **grid},
        rotation={"online": "none"} if method in ("quarot", "rsq") else {},
        calib={"nsamples": 4, "seqlen": 64},
        batch_size=4,
    )
    model, tok = load_model(cfg.model)
    run_quantize(cfg, out, ppl_sources=(), preloaded=(model, tok))


def _float_model_from_export(out):
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_file(str(out / "model.safetensors"))
    state = {k: v.float() for k, v in tensors.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    centred = {}
    for name, module in model.named_modules():
        if f"{name}.qweight" in tensors:
            W, centred[name] = _gptq_weights(tensors, name, qc, module.in_features)
            state[f"{name}.weight"] = W
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    if missing:
        model.tie_weights()
    return model, centred, qc


@pytest.mark.parametrize(
    "method,bits,grid",
    [
        ("rsq", 3, {}),  # rotated RSQ, --online-rotations none
        ("quarot", 4, {"group_size": 32}),
        ("gptq", 2, {}),
        ("gptq", 8, {}),
        ("gptq", 4, {"group_size": 32, "symmetric": False}),
    ],
)
def test_gptq_export_unpacks_to_rsqs_model(tiny_model_dir, tmp_path, method, bits, grid):
    from rsq.eval.perplexity import perplexity
    from rsq.quant.pack import unpack_codes

    ckpt, out = tmp_path / "ckpt", tmp_path / "gptq"
    _quantize(tiny_model_dir("llama"), ckpt, method, bits, **grid)
    summary = export_gptq(ckpt, out)
    assert summary["bits"] == bits
    model, centred, qc = _float_model_from_export(out)
    assert (qc["quant_method"], qc["bits"], qc["checkpoint_format"], qc["desc_act"]) == ("gptq", bits, "gptq", False)
    assert qc["group_size"] == grid.get("group_size", -1) and qc["sym"] == grid.get("symmetric", True)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()
    head = card.split("---")[1]
    assert "quantized_by: rsq" in head and "library_name: transformers" in head and "base_model:" in head
    assert f"{bits} bits" in card and "vllm serve" in card

    loaded, _ = rsq.load(ckpt)
    src = load_file(str(ckpt / "model.safetensors"))
    rqc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    for name, c in centred.items():
        m = loaded.get_submodule(name)
        codes = unpack_codes(src[f"{name}.qweight"], bits, m.in_features).long()
        z = src[f"{name}.qzeros"].long().repeat_interleave(m.in_features // src[f"{name}.qzeros"].shape[1], dim=1)
        assert torch.equal(c, codes - z), name  # the integers are rsq's exactly
    assert sorted(centred) == sorted(rqc["modules"])

    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < TOL
    windows = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    p_rsq, p_gptq = perplexity(loaded, windows, torch.device("cpu")), perplexity(model, windows, torch.device("cpu"))
    # the same integers; the export's fp16 scales move the logits within TOL: perplexity within 1e-4
    # relative (was "equal to 4 digits", which fails when the two straddle a rounding boundary, e.g.
    # 517.9497 vs 517.9521: 4.7e-6 apart)
    assert abs(p_rsq - p_gptq) < 1e-4 * p_rsq, (p_rsq, p_gptq)


def test_refusals_leave_nothing(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "exact"
    _quantize_exact = RSQConfig.for_method(
        "quarot", model=str(tiny_model_dir("llama")), grid={"bits": 3}, calib={"nsamples": 4, "seqlen": 64}
    )
    model, tok = load_model(_quantize_exact.model)
    run_quantize(_quantize_exact, ckpt, ppl_sources=(), preloaded=(model, tok))
    out = tmp_path / "o"
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "gptq", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--online-rotations none" in err and "\n" not in err and not out.exists()
    assert not list(tmp_path.glob(".o.tmp-*"))

    nf = tmp_path / "nf"
    _quantize(tiny_model_dir("llama"), nf, "gptq", 3, kind="nf")
    with pytest.raises(ExportError, match="nf grid cannot be exported to gptq"):
        export_gptq(nf, out)
    assert not out.exists()
