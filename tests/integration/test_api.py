"""The Python API: rsq.quantize with a loaded model, texts / token tensors / a datasets.Dataset, a
config object or a YAML/JSON recipe (the file `rsq quantize --config` reads); rsq.load."""

import json

import pytest
import torch
from safetensors.torch import load_file

import rsq
from rsq.calib.datasets import find_wikitext_files, read_text, sample_windows, tokenize
from rsq.cli.main import make_parser
from rsq.cli.options import build_config
from rsq.config import CalibConfig, GridConfig, RSQConfig
from rsq.errors import ConfigError
from rsq.io.loading import load_model
from rsq.recipe import config_from_recipe, write_recipe


def _texts(n=40):
    _, test = find_wikitext_files()
    lines = [ln for ln in read_text(test).splitlines() if len(ln) > 200]
    return lines[:n]


def _cfg(model_dir, **kw):
    return RSQConfig(
        model=str(model_dir),
        method="gptq",
        grid=GridConfig(bits=3),
        calib=CalibConfig(nsamples=4, seqlen=64),
        batch_size=4,
        **kw,
    )


def _tensors(out):
    return load_file(str(out / "model.safetensors"))


def _equal(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_texts_tensor_dataset_and_loaded_model_give_one_checkpoint(tiny_model_dir, tmp_path):
    d = tiny_model_dir("llama")
    texts = _texts()
    cfg = _cfg(d)
    model, tok = load_model(str(d))
    out = rsq.quantize(cfg, tmp_path / "texts", model=model, tokenizer=tok, calibration=texts)
    assert out == tmp_path / "texts"
    loaded, ltok = rsq.load(out)
    assert ltok is not None and type(loaded).__name__ == "LlamaForCausalLM"
    # oracle: the same windows built by hand from the same token stream, passed as a 2-D tensor
    ids = tokenize(tok, "\n\n".join(texts))
    windows = sample_windows(ids, 4, 64, cfg.seed)
    rsq.quantize(cfg, tmp_path / "windows", model=load_model(str(d))[0], tokenizer=tok, calibration=windows)
    _equal(_tensors(out), _tensors(tmp_path / "windows"))
    recorded = json.loads((tmp_path / "windows" / "results.json").read_text())["config"]["calib"]
    assert (recorded["nsamples"], recorded["seqlen"]) == (4, 64)
    # a 1-D stream and a datasets.Dataset (text column), with the model given by path
    rsq.quantize(cfg, tmp_path / "stream", model=str(d), calibration=ids)
    _equal(_tensors(out), _tensors(tmp_path / "stream"))
    from datasets import Dataset

    ds = Dataset.from_dict({"body": texts, "n": list(range(len(texts)))})
    rsq.quantize(cfg, tmp_path / "ds", calibration=ds, text_column="body")
    _equal(_tensors(out), _tensors(tmp_path / "ds"))
    with pytest.raises(ConfigError, match="no 'text' column"):
        rsq.quantize(cfg, tmp_path / "bad", calibration=ds)
    with pytest.raises(ConfigError, match="tokenizer"):
        rsq.quantize(cfg, tmp_path / "bad", model=model, calibration=texts)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_file_is_the_config(tiny_model_dir, tmp_path, suffix):
    d = tiny_model_dir("llama")
    cfg = _cfg(d)
    recipe = write_recipe(cfg, tmp_path / f"recipe{suffix}")
    assert config_from_recipe(json.loads(json.dumps(cfg.to_dict()))) == cfg
    out = rsq.quantize(recipe, tmp_path / "from-file")
    rsq.quantize(cfg, tmp_path / "from-object")
    _equal(_tensors(out), _tensors(tmp_path / "from-object"))
    # the CLI reads the same file; flags override it
    parser = make_parser()
    args = parser.parse_args(["quantize", "--config", str(recipe), "--bits", "4", "--out", "x"])
    assert build_config(args) == RSQConfig.from_dict({**cfg.to_dict(), "grid": {**cfg.to_dict()["grid"], "bits": 4}})
    # keyword overrides in Python too
    assert rsq.api._config(recipe, {"grid": {"bits": 4}}) == build_config(args)


def test_partial_recipe_takes_the_method_presets(tmp_path):
    parser = make_parser()
    for method in ("rtn", "gptq", "quarot", "rsq"):
        (tmp_path / "r.yaml").write_text(f"method: {method}\ngrid: {{bits: 4}}\n")
        from_flags = build_config(parser.parse_args(["quantize", "--method", method, "--bits", "4", "--out", "x"]))
        from_file = build_config(parser.parse_args(["quantize", "--config", str(tmp_path / "r.yaml"), "--out", "x"]))
        assert from_file == from_flags
    (tmp_path / "bad.yaml").write_text("grid: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(parser.parse_args(["quantize", "--config", str(tmp_path / "bad.yaml"), "--out", "x"]))
    (tmp_path / "typo.json").write_text('{"grid": {"bitz": 3}}')
    with pytest.raises(ConfigError, match="bitz"):
        rsq.quantize(tmp_path / "typo.json", tmp_path / "o")
