"""A model streamed layer by layer from its safetensors files (rsq.io.streaming) against the same job
with the whole model in memory: the same checkpoint bit for bit, a kill + resume that changes
nothing, bad shards refused before any layer, and at most two layers' weights materialized."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsq.checkpoint import save as save_mod
from rsq.cli.main import main
from rsq.config import RSQConfig
from rsq.job.run import _Interrupted, partial_dir, run_quantize
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer_dir):
    """family -> a 3-layer tiny model saved with save_pretrained in shards of ~40 kB (+ tokenizer)."""
    from transformers import AutoTokenizer

    made = {}

    def make(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"stream-{family}")
            tiny_model(family, layers=3).save_pretrained(out, max_shard_size="40KB")
            AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(out)
            assert (out / "model.safetensors.index.json").is_file()  # really sharded
            made[family] = out
        return made[family]

    return make


def _cfg(model_dir, method="rsq"):
    return RSQConfig.for_method(
        method, model=str(model_dir), grid={"bits": 3}, calib={"nsamples": 4, "seqlen": 32}, batch_size=3
    )


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def streamed_equals_in_memory(cfg: RSQConfig, tmp_path: Path, windows: int) -> tuple[dict, dict]:
    """Quantize ``cfg`` in memory (tmp_path/mem) and streamed (tmp_path/st); assert the checkpoints
    are bit-identical and the perplexities equal; return both results."""
    mem = run_quantize(cfg, tmp_path / "mem", ppl_seqlen=32, ppl_max_windows=windows, ppl_batch_size=2, stream=False)
    st = run_quantize(cfg, tmp_path / "st", ppl_seqlen=32, ppl_max_windows=windows, ppl_batch_size=2)
    assert st["streamed"] and not mem["streamed"]
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
    # the windows went through the layers one at a time with the same batches and the same
    # quantized weights: the same float operations, so the same perplexity bit for bit
    assert st["perplexity"]["wikitext2"] == mem["perplexity"]["wikitext2"]
    return mem, st


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_checkpoint_equals_in_memory(model_dirs, tmp_path, family):
    mem, st = streamed_equals_in_memory(_cfg(model_dirs(family)), tmp_path, windows=5)
    # the same small checkpoint layout: shards joined into one model.safetensors
    assert sorted(p.name for p in (tmp_path / "st").glob("model*")) == ["model.safetensors"]
    assert st["modules"] == mem["modules"]
    assert (
        json.loads((tmp_path / "st" / "results.json").read_text())["host_memory"]["measured_by_stage_GiB"]["save"] > 0
    )


def test_streamed_kill_and_resume_is_bit_identical(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(save_mod, "MERGE_BELOW", 0)  # keep the per-layer shards and the index
    cfg = _cfg(model_dirs("qwen2"))
    full = tmp_path / "full"
    run_quantize(cfg, full, ppl_sources=())
    assert (full / "model.safetensors.index.json").is_file()
    killed = tmp_path / "killed"
    with pytest.raises(_Interrupted):
        run_quantize(cfg, killed, ppl_sources=(), stop_after_layer=1)
    part = partial_dir(killed)
    # each finished layer's checkpoint shard was written as it finished, the rest not yet
    assert sorted(p.name for p in part.glob("model-*.safetensors")) == [
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
    ]
    run_quantize(cfg, killed, ppl_sources=(), resume=True)
    _assert_same_checkpoint(full, killed)
    assert (full / "model.safetensors.index.json").read_text() == (killed / "model.safetensors.index.json").read_text()
    from rsq.checkpoint.load import load_quantized

    model, _ = load_quantized(killed)  # the sharded layout loads
    ids = torch.arange(16)[None]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_streamed_run_holds_at_most_two_layers(model_dirs, tmp_path, monkeypatch):
    """Non-meta parameter bytes of the decoder layers at every layer's turn, counted on the model
    itself, against one layer's size from the config (the oracle: q, k, v, o, gate, up, down and
    two norms, float32)."""
    from rsq.io.streaming import LayerStreamer

    model_dir = model_dirs("llama")
    config = json.loads((model_dir / "config.json").read_text())
    d, inter, heads, kv = (
        config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    hd = d // heads
    layer_bytes = 4 * (d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * inter + 2 * d)
    seen = []
    original = LayerStreamer.fetch

    def counting_fetch(self, index, layer):
        original(self, index, layer)
        layers = self.model.get_submodule("model.layers")
        seen.append(sum(p.numel() * p.element_size() for p in layers.parameters() if p.device.type != "meta"))

    monkeypatch.setattr(LayerStreamer, "fetch", counting_fetch)
    run_quantize(_cfg(model_dir, "gptq"), tmp_path / "out", ppl_sources=())
    assert len(seen) == config["num_hidden_layers"] == 3
    assert max(seen) <= 2 * layer_bytes
    assert seen[0] == layer_bytes  # the layer at its turn is all there (the count sees real tensors)


def _corrupt(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif how == "not_in_shard":
        other = next(f for f in sorted(set(index["weight_map"].values())) if dst / f != shard)
        index["weight_map"]["model.layers.1.mlp.down_proj.weight"] = other
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "unlisted":
        del index["weight_map"]["model.layers.2.self_attn.q_proj.weight"]
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "shape":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["intermediate_size"] += 8
        (dst / "config.json").write_text(json.dumps(cfg))
    return shard


@pytest.mark.parametrize(
    "how,expect",
    [
        ("missing", "is missing"),
        ("truncated", "truncated"),
        ("not_in_shard", "lacks 1 tensor"),
        ("unlisted", "model.layers.2.self_attn.q_proj.weight"),
        ("shape", "has shape"),
    ],
)
def test_bad_shards_fail_before_the_first_layer(model_dirs, tmp_path, capsys, how, expect):
    bad = tmp_path / "bad"
    shard = _corrupt(model_dirs("llama"), bad, how)
    out = tmp_path / "out"
    capsys.readouterr()  # the fixture's save_pretrained progress bars
    rc = main(["quantize", str(bad), "--method", "gptq", "--bits", "3", "--nsamples", "2", "--seqlen", "32",
               "--out", str(out), "--ppl", "none"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    print(err)
    assert rc == 2
    assert len(err.splitlines()) == 1 and expect in err, err
    named = shard.name if how in ("missing", "truncated") else ("config" if how == "shape" else "index")
    assert named in err or "model.safetensors.index.json" in err, err
    assert not out.exists() and not partial_dir(out).exists()


@pytest.mark.parametrize("first,then", [(None, False), (False, None)])
def test_resume_may_switch_between_streamed_and_in_memory(model_dirs, tmp_path, first, then):
    """Killed in one mode, resumed in the other (e.g. rsq ablate resumes cells with the model in
    memory): the same checkpoint as an uninterrupted run, with no stale shard left over."""
    cfg = _cfg(model_dirs("llama"), "gptq")
    run_quantize(cfg, tmp_path / "full", ppl_sources=())
    out = tmp_path / "out"
    with pytest.raises(_Interrupted):
        run_quantize(cfg, out, ppl_sources=(), stop_after_layer=0, stream=first)
    run_quantize(cfg, out, ppl_sources=(), resume=True, stream=then)
    _assert_same_checkpoint(tmp_path / "full", out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


# -- the reads and writes off the loop's path (rsq.io.streaming prefetch, rsq.job.store writer)


def _files(ckpt: Path) -> dict[str, object]:
    """Every file of a finished directory but results.json (its timings differ run to run): its
    bytes; a safetensors file as (header, data bytes), the header parsed (safetensors writes the
    metadata map in a hash order that differs between two writes of the same file)."""
    import struct

    out = {}
    for p in sorted(ckpt.iterdir()):
        if p.is_file() and p.name != "results.json":
            raw = p.read_bytes()
            if p.suffix == ".safetensors":
                n = struct.unpack("<Q", raw[:8])[0]
                out[p.name] = (json.loads(raw[8 : 8 + n]), raw[8 + n :])
            else:
                out[p.name] = raw
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_background_reads_and_writes_give_the_same_bytes(model_dirs, tmp_path, monkeypatch, family):
    """The oracle is the same job with the reads and writes in the loop (overlap_io=False): every
    file of the output byte for byte, the per-layer shards kept apart; and the work really moved to
    the reader and writer threads (layer i + 1 read while layer i is worked on)."""
    import threading

    from rsq.io.streaming import LayerStreamer
    from rsq.job import store as store_mod

    monkeypatch.setattr(save_mod, "MERGE_BELOW", 0)  # keep the per-layer shards and the index
    seen = []
    read, write = LayerStreamer._read_layer, store_mod.write_layer_shard

    def reading(self, index):
        seen.append(("read", index, threading.current_thread().name))
        return read(self, index)

    def writing(layer, index, *args, **kw):
        seen.append(("write", index, threading.current_thread().name))
        return write(layer, index, *args, **kw)

    monkeypatch.setattr(LayerStreamer, "_read_layer", reading)
    monkeypatch.setattr(store_mod, "write_layer_shard", writing)
    cfg = _cfg(model_dirs(family))
    a = run_quantize(cfg, tmp_path / "sync", ppl_seqlen=32, ppl_max_windows=3, ppl_batch_size=2, overlap_io=False)
    assert {thread for *_, thread in seen} == {threading.main_thread().name}
    seen.clear()
    b = run_quantize(cfg, tmp_path / "overlap", ppl_seqlen=32, ppl_max_windows=3, ppl_batch_size=2)
    assert sorted(seen) == sorted(
        [("read", i, "rsq-read_0") for i in range(3)]  # layer 0 during the calibration capture
        + [("write", i, "rsq-write_0") for i in range(3)]
    )  # fmt: skip
    # layer 2 was read before layer 0's shard was written: the read ran during layer 1's turn at latest
    assert seen.index(("read", 2, "rsq-read_0")) < seen.index(("write", 1, "rsq-write_0"))
    sync, overlap = _files(tmp_path / "sync"), _files(tmp_path / "overlap")
    assert len([n for n in sync if n.startswith("model-")]) == 4  # 3 layers + the ends
    assert sync.keys() == overlap.keys()
    for name in sync:
        assert sync[name] == overlap[name], name
    assert a["perplexity"] == b["perplexity"] and a["modules"] == b["modules"]
    # the time the loop waited on the reader and the writer is in the stage split
    assert {"io_wait_read", "io_wait_write"} <= set(b["timings"]["stages"])


@pytest.mark.parametrize("fail_at,overlap", [(0, True), (1, True), (1, False)])
def test_a_failed_background_write_is_the_run_error(model_dirs, tmp_path, monkeypatch, fail_at, overlap):
    """A shard write that fails on the writer thread (here: disk full half-way through) stops the
    run with its own error; nothing half-written is left: no output directory, no temporary file,
    and state.json claims only the layers whose files are all on disk (none: no partial directory).
    The resumed run then gives the uninterrupted run's checkpoint. The same without the thread."""
    from rsq.job import store as store_mod

    monkeypatch.setattr(save_mod, "MERGE_BELOW", 0)
    cfg = _cfg(model_dirs("qwen2"))
    run_quantize(cfg, tmp_path / "full", ppl_sources=())
    write = store_mod.write_layer_shard

    def failing(layer, index, prefix, n, results, cfg_, out, *args):
        if index == fail_at:
            (out / f"{save_mod.layer_shard_name(index, n)}.tmp").write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return write(layer, index, prefix, n, results, cfg_, out, *args)

    monkeypatch.setattr(store_mod, "write_layer_shard", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        run_quantize(cfg, out, ppl_sources=(), overlap_io=overlap)
    part = partial_dir(out)
    assert not out.exists()
    if fail_at == 0:
        assert not part.exists()  # nothing resumable: nothing left
        return
    assert not list(part.glob("*.tmp"))
    assert json.loads((part / "state.json").read_text())["finished_layers"] == fail_at
    assert sorted(p.name for p in part.glob("model-*.safetensors")) == ["model-00001-of-00004.safetensors"]
    monkeypatch.setattr(store_mod, "write_layer_shard", write)
    run_quantize(cfg, out, ppl_sources=(), resume=True)
    _assert_same_checkpoint(tmp_path / "full", out)


def test_a_failed_background_read_is_the_run_error(model_dirs, tmp_path, monkeypatch):
    """A layer read that fails on the reader thread (a shard damaged after the check) is the run's
    error, raised when the loop reaches that layer; the layers before it are resumable."""
    from rsq.errors import CheckpointFormatError
    from rsq.io.streaming import StreamSource

    read = StreamSource.read

    def damaged(self, names, dtype, pin=False):
        if any(n.startswith("model.layers.2.") for n in names):
            raise CheckpointFormatError("shard damaged (test)")
        return read(self, names, dtype, pin)

    monkeypatch.setattr(StreamSource, "read", damaged)
    out = tmp_path / "out"
    with pytest.raises(CheckpointFormatError, match="damaged"):
        run_quantize(_cfg(model_dirs("llama"), "gptq"), out, ppl_sources=())
    assert not out.exists()
    assert json.loads((partial_dir(out) / "state.json").read_text())["finished_layers"] == 2


def test_streamed_equals_in_memory_with_non_pow2_export_block(model_dirs, tmp_path):
    """--export-block 48 (the tiny Llama's 96-wide down_proj input in 2 blocks of paley1(q=11) ⊗
    sylvester(4)): the streamed run rotates each layer as it reads it, with the same block, and
    writes the in-memory run's checkpoint bit for bit."""
    cfg = RSQConfig.for_method(
        "rsq",
        model=str(model_dirs("llama")),
        grid={"bits": 3},
        rotation={"online": "export", "export_block": 48},
        calib={"nsamples": 4, "seqlen": 32},
        batch_size=3,
    )
    streamed_equals_in_memory(cfg, tmp_path, windows=2)
    for d in ("mem", "st"):
        rot = json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["rotation"]
        down = next(s for s in rot["online"] if s["module"] == "mlp.down_proj")
        assert (down["kind"], down["head_dim"]) == ("block", 48)
