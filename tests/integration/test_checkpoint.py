"""save -> load -> logits match the in-memory fake-quantized model; corrupt checkpoints fail clearly."""

import json

import pytest
import torch

import rsq
from rsq.config import (
    GridConfig,
    RSQConfig,
)
from rsq.errors import CheckpointFormatError
from rsq.io.loading import load_model
from rsq.job.run import run_quantize


def _quantize(model_dir, out, method, grid=None, **kw):
    grid = grid or GridConfig(bits=3)
    cfg = RSQConfig.for_method(
        method,
        model=str(model_dir),
        grid=grid,
        calib={"nsamples": 4, "seqlen": 64},
        batch_size=4,
        **kw,
    )
    model, tok = load_model(str(model_dir))
    run_quantize(cfg, out, ppl_sources=(), preloaded=(model, tok))
    return model  # the in-memory fake-quantized (and rotated) model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "family,method",
    [
        ("llama", "rtn"),
        ("llama", "gptq"),
        ("llama", "quarot"),
        ("llama", "rsq"),
        ("qwen2", "rsq"),
        ("mistral", "quarot"),
    ],
)
def test_save_load_logits_match(tiny_model_dir, tmp_path, family, method):
    out = tmp_path / "ckpt"
    ref_model = _quantize(tiny_model_dir(family), out, method)
    loaded, tok = rsq.load(out)
    assert tok is not None
    ids = torch.randint(0, 512, (2, 40))
    ref, got = _logits(ref_model, ids), _logits(loaded, ids)
    # same W_hat bit for bit (codes, float32 scales); only the matmul path differs: float32 rounding
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 3 and qc["seed"] == 0 and len(qc["modules"]) == 2 * 7
    if method in ("quarot", "rsq"):
        assert qc["rotation"]["seed"] == 0 and qc["rotation"]["online"]


@pytest.mark.parametrize(
    "grid",
    [GridConfig(kind="nf", bits=3), GridConfig(kind="e8p", bits=2), GridConfig(bits=4, group_size=32, symmetric=False)],
)
def test_other_grids_round_trip(tiny_model_dir, tmp_path, grid):
    out = tmp_path / "ckpt"
    ref_model = _quantize(tiny_model_dir("llama"), out, "quarot", grid=grid)
    loaded, _ = rsq.load(out)
    ids = torch.randint(0, 512, (1, 32))
    ref, got = _logits(ref_model, ids), _logits(loaded, ids)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    if grid.kind == "e8p":  # one 16-bit code per 8 weights on disk: 2 bits per weight
        from safetensors import safe_open

        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
            codes = [k for k in f.keys() if k.endswith(".codes")]
            assert codes and all(f.get_slice(k).get_dtype() == "I16" for k in codes)


def test_checkpoint_is_small(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    _quantize(tiny_model_dir("llama"), out, "gptq")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    fp = sum(f.stat().st_size for f in tiny_model_dir("llama").glob("*.safetensors"))
    assert size < fp  # 3-bit linears + float32 embeddings vs all float32


def test_save_dtype_bfloat16_rounds_only_the_unquantized_tensors(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    ref_model = _quantize(tiny_model_dir("llama"), tmp_path / "bf16", "quarot", save_dtype="bfloat16")
    _quantize(tiny_model_dir("llama"), tmp_path / "auto", "quarot")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["lm_head.weight"] == "BF16"
    assert all(v != "BF16" for k, v in dtypes.items() if k.endswith(".scales"))  # scales keep float32
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "auto")}
    assert size["bf16"] < 0.75 * size["auto"]  # tiny model: embeddings + untied lm_head dominate
    # oracle: the in-memory model with exactly its unquantized parameters rounded to bfloat16
    loaded, _ = rsq.load(tmp_path / "bf16")
    quantized = set(json.loads((tmp_path / "bf16" / "config.json").read_text())["quantization_config"]["modules"])
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if name.rsplit(".", 1)[0] not in quantized:
                p.copy_(p.to(torch.bfloat16).float())
    ids = torch.randint(0, 512, (2, 40))
    ref, got = _logits(ref_model, ids), _logits(loaded, ids)
    assert next(loaded.parameters()).dtype == torch.float32
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5  # float32 matmul order only, as above


def test_corrupt_checkpoints_raise(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    _quantize(tiny_model_dir("llama"), out, "gptq")
    shard = next(out.glob("*.safetensors"))
    data = shard.read_bytes()
    # truncated weights file
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="corrupt or truncated"):
        rsq.load(out)
    # missing weights file
    shard.unlink()
    with pytest.raises(CheckpointFormatError, match="missing"):
        rsq.load(out)
    shard.write_bytes(data)
    # config that does not match the tensors
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError):
        rsq.load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        rsq.load(out)
    with pytest.raises(CheckpointFormatError, match="missing"):
        rsq.load(tmp_path / "nowhere")
