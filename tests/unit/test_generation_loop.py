"""rsq's decode loop (rsq/generation/loop.py) against transformers' ``generate`` (CPU).

The oracle is transformers' own greedy ``generate(do_sample=False)`` on the same model: the loop
must give the same tokens, exactly (same forward, same float32 arithmetic on the CPU; only the
static cache is longer than the dynamic one, and its extra positions are masked out).
The tiny Llama's weights are N(0, 0.15) so that greedy decoding does not settle on one repeated
token (with the default 0.02 it does, and a wrong position or mask would go unnoticed)."""

from __future__ import annotations

import warnings

import pytest
import torch

from rsq.errors import ConfigError
from rsq.generation import LoopOptions, Sampling, cache_length, decoder, generate
from tests.conftest import tiny_model

PROMPT = 7


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    for p in m.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.15, generator=gen)
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 512, (3, PROMPT), generator=torch.Generator().manual_seed(1))


def _hf(model, ids, n, mask=None, eos=None):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids) if mask is None else mask,
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            pad_token_id=0,
            eos_token_id=eos,
            temperature=None,
            top_p=None,
            top_k=None,
        )


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_equal_transformers_generate(model, ids, batch):
    x = ids[:batch]
    ref = _hf(model, x, 24)
    got = generate(model, x, 24, eos_token_id=())
    assert got.shape == (batch, PROMPT + 24)
    assert torch.equal(got, ref)
    assert len(set(ref[0, PROMPT:].tolist())) > 5  # a varied sequence: positions and cache matter


@pytest.mark.parametrize("every", [1, 4, 16])
def test_eos_stopping_equals_transformers_generate(model, ids, every):
    """Rows end at different steps; ended rows get the pad token; the output stops with the last row
    (the loop looks every ``every`` tokens, then drops what it generated past that point)."""
    free = _hf(model, ids, 40)[:, PROMPT:]
    # an EOS pair that ends row 0 early and row 1 later; row 2 ends with one of them or at the limit
    eos = [int(free[0, 3]), int(free[1, 11])]
    ends = [next((i for i, t in enumerate(row) if t in eos), 39) for row in free.tolist()]
    assert ends[0] <= 3 and 3 < ends[1] <= 11 and ends[0] != max(ends)
    ref = _hf(model, ids, 40, eos=eos)
    assert ref.shape[1] == PROMPT + max(ends) + 1  # the oracle stops with the last row
    got = generate(model, ids, 40, eos_token_id=eos, pad_token_id=0, options=LoopOptions(eos_every=every))
    assert torch.equal(got, ref)
    assert (got[0, PROMPT + ends[0] + 1 :] == 0).all()  # padded after its end


def test_eos_never_met_runs_to_the_limit(model, ids):
    free = _hf(model, ids, 20)
    unseen = next(t for t in range(3, 512) if t not in set(free[:, PROMPT:].flatten().tolist()))
    got = generate(model, ids, 20, eos_token_id=unseen, pad_token_id=0)
    assert torch.equal(got, free)


def test_eos_from_generation_config(model, ids):
    free = _hf(model, ids[:1], 20)
    eos = int(free[0, PROMPT + 5])
    model.generation_config.eos_token_id = eos
    try:
        got = generate(model, ids[:1], 20, pad_token_id=0)
        ignored = generate(model, ids[:1], 20, eos_token_id=())
    finally:
        model.generation_config.eos_token_id = None
    first = free[0, PROMPT:].tolist().index(eos)
    assert torch.equal(got, free[:, : PROMPT + first + 1])
    assert torch.equal(ignored, free)


def test_left_padded_batch_equals_transformers_generate(model, ids):
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    x = ids.masked_fill(mask == 0, 0)
    ref = _hf(model, x, 20, mask=mask)
    got = generate(model, x, 20, attention_mask=mask, eos_token_id=())
    assert torch.equal(got, ref)
    # the mask is used: the same ids unmasked continue differently
    assert not torch.equal(generate(model, x, 20, eos_token_id=())[1], got[1])


def test_right_padding_and_bad_arguments_are_refused(model, ids):
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with pytest.raises(ConfigError, match="left"):
        generate(model, ids, 4, attention_mask=mask)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, ids, 0)
    with pytest.raises(ConfigError, match="batch, tokens"):
        generate(model, ids[0], 4)


def test_cache_sized_per_call_and_reused_within_a_size(model, ids):
    """A short call after a long one gets a short cache (it never attends over the long one); calls
    whose prompt + new tokens round to the same multiple of 256 reuse one cache."""
    dec = decoder(model)
    long = torch.randint(3, 512, (3, 300), generator=torch.Generator().manual_seed(2))
    generate(model, long, 20, eos_token_id=())
    stats = dec.stats
    assert stats["cache_len"] == cache_length(320) == 512
    assert dec.cache.layers[0].keys.shape[2] == 512

    short = generate(model, ids, 20, eos_token_id=())
    stats = dec.stats
    assert stats["cache_len"] == 256 and stats["new_cache"]
    assert dec.cache.layers[0].keys.shape[2] == 256  # the attention's key length of every step
    assert torch.equal(short, _hf(model, ids, 20))  # nothing of the long call leaks in

    cache = dec.cache
    again = generate(model, ids, 30, eos_token_id=())  # 37 positions: same size
    stats = dec.stats
    assert not stats["new_cache"] and dec.cache is cache
    assert torch.equal(again, _hf(model, ids, 30))
    generate(model, ids[:1], 30, eos_token_id=())  # another batch size: another cache
    stats = dec.stats
    assert stats["new_cache"] and dec.cache.layers[0].keys.shape[:3] == (1, 2, 256)


def test_sampling_reduces_to_greedy_and_is_seeded(model, ids):
    greedy = generate(model, ids, 12, eos_token_id=())
    top1 = generate(model, ids, 12, eos_token_id=(), sampling=Sampling(0.7, top_k=1))
    assert torch.equal(top1, greedy)
    nucleus = generate(model, ids, 12, eos_token_id=(), sampling=Sampling(0.7, top_p=1e-6))
    assert torch.equal(nucleus, greedy)
    a = generate(model, ids, 12, eos_token_id=(), sampling=Sampling(1.0, generator=torch.Generator().manual_seed(5)))
    b = generate(model, ids, 12, eos_token_id=(), sampling=Sampling(1.0, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_compiled_step_gives_eager_tokens_and_compiles_once(model, ids):
    """The step under torch.compile (aot_eager on the CPU: the traced graph run op for op), whole
    graph (fullgraph=True), gives the eager tokens; a second call of the same shapes reuses it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = _hf(model, ids, 10)
    got = generate(model, ids, 10, eos_token_id=(), options=LoopOptions(compile=True, backend="aot_eager"))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert torch.equal(got, ref)
    again = generate(model, ids, 12, eos_token_id=(), options=LoopOptions(compile=True, backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] == graphs  # same batch, same cache size: no recompile
    assert torch.equal(again, _hf(model, ids, 12))
    decoder(model).cache = decoder(model).key = None  # a new cache of the same size (new addresses)
    third = generate(model, ids, 12, eos_token_id=(), options=LoopOptions(compile=True, backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] == graphs  # no guard on the cache's addresses
    assert torch.equal(third, again)


def test_compiled_prefill_gives_eager_tokens_for_prompts_of_any_length(model, ids):
    """LoopOptions(compile_prefill=True): the prompt's forward compiled with dynamic shapes (aot_eager
    on the CPU) gives transformers' greedy tokens, and prompts of other lengths reuse the compiled
    prefill (dynamic: no graph per length)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    decoder(model).cache = decoder(model).key = None  # a new cache: its first update is in the compiled prefill
    opts = LoopOptions(compile=False, compile_prefill=True, backend="aot_eager")
    got = generate(model, ids, 6, eos_token_id=(), options=opts)
    assert torch.equal(got, _hf(model, ids, 6))
    assert counters["stats"]["unique_graphs"] >= 1 and decoder(model).prefill is not None
    # its tensors were allocated before the compiled region, so transformers marked them as static
    # addresses (allocated inside it they are not, and a CUDA-graph decode step then skips its graphs
    # for "mutated inputs": measured on an H100, session 17)
    for layer in decoder(model).cache.layers:
        for t in (layer.keys, layer.values, layer.cumulative_length):
            assert getattr(t, "_dynamo_static_input_type", None) is not None
    # the reused cache is allocated now (a new cache's first call compiles its own graph)
    longer = torch.cat([ids, ids[:, :4]], dim=1)  # 11 tokens instead of 7
    assert torch.equal(generate(model, longer, 6, eos_token_id=(), options=opts), _hf(model, longer, 6))
    graphs = counters["stats"]["unique_graphs"]
    shorter = ids[:, :5]
    assert torch.equal(generate(model, shorter, 6, eos_token_id=(), options=opts), _hf(model, shorter, 6))
    assert counters["stats"]["unique_graphs"] == graphs  # 5 tokens after 11: the same compiled prefill


def test_a_step_with_a_graph_break_compiles_with_breaks(model, ids):
    """fullgraph=True on a model whose forward breaks the graph (a hook here): one warning, then the
    step compiles with the break and still gives transformers' tokens."""
    from rsq.generation import loop

    hook = model.model.layers[0].register_forward_pre_hook(lambda *a: torch._dynamo.graph_break())
    loop._DECODERS.pop(model, None)
    torch._dynamo.reset()
    try:
        options = LoopOptions(compile=True, backend="aot_eager")
        with pytest.warns(UserWarning, match="one graph"):
            got = generate(model, ids, 6, eos_token_id=(), options=options)
        assert decoder(model).graph_breaks
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            again = generate(model, ids, 6, eos_token_id=(), options=options)
        ref = _hf(model, ids, 6)
    finally:
        hook.remove()
        loop._DECODERS.pop(model, None)
    assert torch.equal(got, ref) and torch.equal(again, ref)


@pytest.fixture(scope="module")
def rsq_model(model, tiny_tokenizer_dir, tmp_path_factory):
    """The module's model quantized by rsq (4-bit GPTQ with QuaRot's rotations: packed linears and
    online Hadamards) and loaded back with rsq.load."""
    from transformers import AutoTokenizer

    import rsq
    from rsq.config import CalibConfig, GridConfig, ImportanceConfig, RotationConfig, RSQConfig
    from rsq.io.loading import load_model
    from rsq.job.run import run_quantize

    src, ckpt = tmp_path_factory.mktemp("gen-src"), tmp_path_factory.mktemp("gen-ckpt") / "ckpt"
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(src)
    cfg = RSQConfig(
        model=str(src),
        method="quarot",
        grid=GridConfig(bits=4),
        rotation=RotationConfig(enabled=True),
        importance=ImportanceConfig(strategy="uniform"),
        calib=CalibConfig(nsamples=4, seqlen=64),
        batch_size=4,
    )
    run_quantize(cfg, ckpt, ppl_sources=(), preloaded=load_model(str(src)))
    loaded, _ = rsq.load(ckpt)
    loaded.rsq_test_dir = ckpt
    return loaded


def test_rsq_model_greedy_tokens_equal_transformers_generate(rsq_model, ids):
    from torch._dynamo.utils import counters

    from rsq.nn.linear import QuantizedLinear

    assert any(isinstance(m, QuantizedLinear) for m in rsq_model.modules())
    ref = _hf(rsq_model, ids, 16)
    assert torch.equal(generate(rsq_model, ids, 16, eos_token_id=()), ref)
    assert torch.equal(generate(rsq_model, ids[:1], 16, eos_token_id=()), _hf(rsq_model, ids[:1], 16))
    torch._dynamo.reset()
    counters.clear()
    options = LoopOptions(compile=True, backend="aot_eager")  # fullgraph=True: the whole step
    compiled = generate(rsq_model, ids, 16, eos_token_id=(), options=options)
    assert counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(compiled, ref)


def test_cli_rsq_loop_prints_the_hf_loops_text(rsq_model, capsys):
    """`rsq generate --loop rsq` (the default on CUDA) prints what `--loop hf` prints, greedy and with
    the tokenizer's EOS; it reports the loop's step timings."""
    from rsq.cli.main import main

    texts = []
    for loop in ("hf", "rsq"):
        assert (
            main(["generate", str(rsq_model.rsq_test_dir), "The tower is", "--max-new-tokens", "12", "--loop", loop])
            == 0
        )
        captured = capsys.readouterr()
        texts.append(captured.out)
    assert texts[0] == texts[1] and texts[0].strip()
    assert "then" in captured.err and "tokens/s" in captured.err  # the rsq loop's summary


def test_loop_summary_words():
    from rsq.cli.cmd_generate import loop_summary

    assert loop_summary({}) is None
    text = loop_summary(dict(prefill_s=0.5, first_step_s=10.0, decode_s=1.0, steps=100))
    assert text == "prefill + first token 0.50 s, first decode step 10.0 s, then 100.0 tokens/s"
    cold = loop_summary(dict(prefill_s=40.0, first_step_s=35.0, decode_s=1.0, steps=100, compiled=True, new_cache=True))
    assert cold.startswith("prefill + first token 40.00 s, first decode step 35.0 s (one-time: ")
    assert cold.endswith("), then 100.0 tokens/s")


def _is_greedy(model, out: torch.Tensor, prompt: int) -> None:
    """Each new token of ``out`` is the argmax of an eager forward (no cache) over the tokens before
    it, within 1e-3 of the largest logit: the compiled step's kernels (inductor, CUDA graphs) may
    differ from eager ones in the last bits, so exact equality to transformers is not the oracle."""
    with torch.no_grad():
        logits = model(input_ids=out[:, :-1]).logits.float()[:, prompt - 1 :]
    best = logits.max(-1).values
    chosen = logits.gather(-1, out[:, prompt:, None])[..., 0]
    assert (chosen >= best - 1e-3 * best.abs().max()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["llama", "rsq"])
def test_cuda_default_compiles_the_step_into_cuda_graphs(model, rsq_model, ids, which):
    """On CUDA the default compiles the step (inductor, mode="reduce-overhead"): greedy tokens, no
    CUDA graph skipped (no input mutation or CPU tensor spoils the graph), and a second call of the
    same shapes compiles nothing new."""
    import copy

    from torch._dynamo.utils import counters

    m = copy.deepcopy(model if which == "llama" else rsq_model).cuda()
    x = ids.cuda()
    torch._dynamo.reset()
    counters.clear()
    out = generate(m, x, 24, eos_token_id=())
    assert decoder(m).stats["compiled"] and counters["stats"]["unique_graphs"] >= 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    _is_greedy(m, out, PROMPT)
    graphs = counters["stats"]["unique_graphs"]
    again = generate(m, x, 24, eos_token_id=())
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again, out)
    free = out[:, PROMPT:]
    eos = [int(free[0, 3]), int(free[1, 9])]
    ended = generate(m, x, 24, eos_token_id=eos, pad_token_id=0)
    ends = [next((i for i, t in enumerate(row) if t in eos), 23) for row in free.tolist()]
    assert ended.shape[1] == PROMPT + max(ends) + 1
    for r, e in enumerate(ends):
        assert torch.equal(ended[r, : PROMPT + e + 1], out[r, : PROMPT + e + 1])
        assert (ended[r, PROMPT + e + 1 :] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_without_graphs(model, ids):
    """LoopOptions(cuda_graphs=False): the step compiled by inductor, launched without CUDA graphs
    (what bench/decode_profile.py falls back to): greedy tokens, a step of its own."""
    import copy

    m = copy.deepcopy(model).cuda()
    out = generate(m, ids.cuda(), 24, eos_token_id=(), options=LoopOptions(cuda_graphs=False))
    assert decoder(m).stats["compiled"] and decoder(m).step_key[-1] is False
    _is_greedy(m, out, PROMPT)


def test_cuda_graphs_only_for_inductor_on_cuda():
    from rsq.generation.loop import _graphs

    assert _graphs(True, "inductor", "cuda:0")
    assert not _graphs(True, "aot_eager", "cuda")  # other backends take no mode
    assert not _graphs(True, "inductor", "cpu") and not _graphs(False, "inductor", "cuda")
    assert not _graphs(True, "inductor", "cuda", cuda_graphs=False)  # LoopOptions(cuda_graphs=False)
