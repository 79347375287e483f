"""Every bundled real configuration (Llama 3/3.1/3.2, Mistral 7B/Nemo, Qwen2.5 0.5B-72B): the full
rotation and quantization plan from the config alone, and the whole pipeline on tiny versions."""

import json

import pytest
import torch

import rsq
from rsq.config import (
    CalibConfig,
    GridConfig,
    ImportanceConfig,
    RotationConfig,
    RSQConfig,
    SolverConfig,
)
from rsq.models.bundled import list_bundled, load_bundled_config, tiny_config
from rsq.models.registry import resolve
from rsq.plan.memory import memory_plan, rotation_plan

EXACT = {  # orders that must resolve to a real Hadamard matrix (no fallback)
    "qwen2.5-0.5b": {"residual (R1)": 896, "down_proj input": 4864},
    "qwen2.5-72b": {"down_proj input": 29568},
    "qwen2.5-3b": {"down_proj input": 11008},
    "qwen2.5-7b": {"residual (R1)": 3584, "down_proj input": 18944, "o_proj cross-head": 28},
    "mistral-nemo-12b": {"residual (R1)": 5120, "down_proj input": 14336},
}


@pytest.mark.parametrize("name", list_bundled())
def test_plan_resolves_every_site_and_module(name):
    config = load_bundled_config(name)
    adapter = resolve(config)
    sites = {s.name: s for s in rotation_plan(config, adapter)}
    for site, order in EXACT.get(name, {}).items():
        assert sites[site].order == order and "skipped" not in sites[site].recipe and "random" not in sites[site].recipe
    if name == "qwen2.5-0.5b":
        assert "skipped" in sites["o_proj cross-head"].recipe  # 14 heads: no Hadamard of order 14
    # every module the pipeline touches exists on the (meta) model with the planned shape
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = adapter.get_layers(model)[0]
    for short, (out_f, in_f) in adapter.linear_shapes(config).items():
        module = layer.get_submodule(getattr(adapter, short))
        assert (module.out_features, module.in_features) == (out_f, in_f), (name, short)
    mem = memory_plan(config, adapter, nsamples=256, seqlen=4096, ranks=2)
    # 3-bit linears + 16-bit embeddings: well under half the bf16 size even with big vocabularies
    assert mem["calib_activations_per_rank_GiB"] > 0 and mem["checkpoint_GiB"] < mem["bf16_model_GiB"] / 2


FAMILIES = ["llama-3-8b", "llama-3.2-1b", "mistral-nemo-12b", "qwen2.5-0.5b", "qwen2.5-3b", "qwen2.5-7b"]


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_family_pipeline_and_checkpoint(name, tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_config(load_bundled_config(name), layers=2, vocab_size=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    src = tmp_path / "src"
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(src)
    cfg = RSQConfig(
        model=str(src),
        method="rsq",
        grid=GridConfig(bits=3),
        solver=SolverConfig(),
        rotation=RotationConfig(enabled=True),
        importance=ImportanceConfig(strategy="attncon"),
        calib=CalibConfig(nsamples=4, seqlen=64),
        batch_size=4,
    )
    work = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(src)
    out = tmp_path / "q"
    rsq.quantize(cfg, out, ppl_sources=(), preloaded=(work, tok))
    loaded, _ = rsq.load(out)
    ids = torch.randint(0, 512, (1, 48))
    with torch.no_grad():
        ref, got = work(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    kinds = {r["module"]: r["kind"] for r in qc["rotation"]["online"]}
    # the default --online-rotations export: the block-diagonal Sylvester Hadamard on the intermediate
    assert kinds["mlp.down_proj"] == "block"
