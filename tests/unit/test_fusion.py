"""Fused sibling projections (rsq/generation/fusion.py) against the unfused model (CPU).

Oracles: the same loaded checkpoint unfused (logits, greedy tokens, saved files, state dict), each
member's own product from its own buffers, and the float32 forward error bound of a dot product.

Tolerance of the fused products: the fused layer computes every output row from that row's codes,
scale and zero point exactly as the member does (same W_hat, same input), but the CPU BLAS may
pick another kernel for the wider (or, for Qwen2's 8-wide k/v, the narrower) GEMM and so another
summation order over K. Observed: bit-identical for the tiny Llama and Mistral, up to ~12 float32
ulps for Qwen2's 8-row k/v (K = 56). Two float32 summation orders of a K-term dot product differ
by at most 2 gamma_K sum_k |x_k w_k| (gamma_K = K u / (1 - K u), u = 2^-24), plus the bias
addition's rounding: that bound is asserted per product. On the logits after two layers the
differences stay at that level: asserted within 1e-5 of the logits' largest magnitude (a wrong slice
or row order would be O(1)).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from rsq.generation import LoopOptions, decoder, fuse_siblings, generate, unfuse
from rsq.generation.fusion import fusable, groups
from tests.conftest import tiny_model

FAMILIES = ("llama", "qwen2", "mistral")
PROMPT = 7
LOGIT_TOL = 1e-5  # relative to max |logit|: float32 summation-order differences (module docstring)


@pytest.fixture(scope="module")
def checkpoints(tiny_tokenizer_dir, tmp_path_factory):
    """family -> an rsq checkpoint (3-bit RTN per channel, rotated, `exact` online rotations on
    o_proj and down_proj) of the tiny model with N(0, 0.15) weights (varied greedy tokens)."""
    from transformers import AutoTokenizer

    from rsq.config import CalibConfig, GridConfig, RotationConfig, RSQConfig, SolverConfig
    from rsq.io.loading import load_model
    from rsq.job.run import run_quantize

    out = {}
    for family in FAMILIES:
        src = tmp_path_factory.mktemp(f"fuse-src-{family}")
        m = tiny_model(family)
        gen = torch.Generator().manual_seed(0)
        for p in m.parameters():
            if p.dim() == 2:
                p.data.normal_(0, 0.15, generator=gen)
        m.save_pretrained(src)
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(src)
        cfg = RSQConfig(
            model=str(src),
            method="rtn",
            grid=GridConfig(bits=3, mse_clip=False),
            solver=SolverConfig(algorithm="rtn"),
            rotation=RotationConfig(enabled=True, online="exact"),
            calib=CalibConfig(nsamples=2, seqlen=32),
        )
        ckpt = tmp_path_factory.mktemp(f"fuse-ckpt-{family}") / "ckpt"
        run_quantize(cfg, ckpt, ppl_sources=(), preloaded=load_model(str(src)))
        out[family] = ckpt
    return out


def _load(path, packed: bool = False):
    """A fresh model from the checkpoint; ``packed``: the packed reference path instead of the
    CPU's dense mode (both are what forward runs on the CPU)."""
    import rsq

    model, _ = rsq.load(path)
    if packed:
        for m in model.modules():
            if hasattr(m, "dense_cache"):
                m.dense_cache, m.dense_weight_cache = False, None
    return model


def _ids(batch: int = 2, tokens: int = PROMPT) -> torch.Tensor:
    return torch.randint(3, 512, (batch, tokens), generator=torch.Generator().manual_seed(1))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_equal_the_unfused_model(checkpoints, family, packed):
    model = _load(checkpoints[family], packed)
    ids = _ids()
    ref = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fuse_siblings(model)
    layers = model.config.num_hidden_layers
    assert report.skipped == []
    pairs = ("q_proj+k_proj+v_proj", "gate_proj+up_proj")
    assert report.fused == [f"layer {i}: {g}" for i in range(layers) for g in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group switches itself off
        got = _logits(model, ids)
    assert (got - ref).abs().max() <= LOGIT_TOL * ref.abs().max()
    assert all(g.active and g.misses == 0 for g in groups(model)) and len(groups(model)) == 2 * layers
    # the members' buffers are row slices of the fused ones (no new memory), the state dict unchanged
    attn = model.model.layers[0].self_attn
    fused = attn.q_proj.sibling[0].fused
    assert attn.v_proj.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
    assert attn.k_proj.qweight.data_ptr() == fused.qweight[attn.q_proj.out_features :].data_ptr()
    assert sum(m.qweight.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj)) == fused.qweight.numel()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    # nothing computed is left behind between forwards
    assert all(g._outs is None and g._x is None for g in groups(model))


def _bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """2 gamma_{K+1} (|x| @ |W|^T + |b|): the largest difference of two float32 summation orders."""
    k = x.shape[-1] + 1
    u = 2.0**-24
    gamma = k * u / (1 - k * u)
    mag = x.double().abs() @ w.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    return 2 * gamma * mag


@pytest.mark.parametrize("family", FAMILIES)
def test_each_slice_is_the_member_s_own_product(checkpoints, family):
    """Each member's output (its slice) against the product of its own buffers computed alone."""
    model = _load(checkpoints[family], packed=True)
    fuse_siblings(model)
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for group in groups(model):
        outs = [m(x) for m in group.members]
        assert group.misses == 0
        group.active = False  # each computes from its own (view) buffers
        for m, y in zip(group.members, outs):
            alone = m(x)
            assert y.shape == alone.shape == (5, m.out_features)
            diff = (y.double() - alone.double()).abs()
            assert (diff <= _bound(x, m.dequantize_weight(), m.bias)).all(), diff.max()
        group.active = True


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_identical_through_generate(checkpoints, family):
    model = _load(checkpoints[family])
    ids = _ids(3)
    ref = generate(model, ids, 20, eos_token_id=(), options=LoopOptions(fuse=False))
    assert decoder(model).stats["fused"] == 0 and not groups(model)
    got = generate(model, ids, 20, eos_token_id=(), options=LoopOptions(fuse=True))
    assert decoder(model).stats["fused"] == 2 * model.config.num_hidden_layers
    assert torch.equal(got, ref)
    assert len(set(ref[0, PROMPT:].tolist())) > 4  # a varied sequence
    # off CUDA the default leaves the model as it is; fuse=False undoes the fusion
    generate(model, ids, 4, eos_token_id=())
    assert decoder(model).stats["fused"] == 2 * model.config.num_hidden_layers
    again = generate(model, ids, 20, eos_token_id=(), options=LoopOptions(fuse=False))
    assert not groups(model) and torch.equal(again, ref)


def test_fused_step_compiles_as_one_graph_with_static_fused_buffers(checkpoints):
    """The decode step of a fused model under torch.compile(fullgraph=True): one graph, no break,
    4 quantized matmuls per layer (q/k/v, o, gate/up, down), the fused buffers static inputs (a
    CUDA graph reads them in place), and the unfused model's greedy tokens."""
    from torch._dynamo.utils import counters

    model = _load(checkpoints["qwen2"], packed=True)  # the packed path: the custom op, as on a GPU
    ids = _ids(2)
    ref = generate(model, ids, 10, eos_token_id=(), options=LoopOptions(fuse=False))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    options = LoopOptions(compile=True, backend=backend, fuse=True)  # fullgraph=True: the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does not compile as one graph" fallback
        got = generate(model, ids, 10, eos_token_id=(), options=options)
    assert not decoder(model).graph_breaks and not counters["graph_break"]
    assert len(graphs) == 1
    assert torch.equal(got, ref)
    gm = graphs[0]
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and "quant_linear" in str(n.target)]
    assert len(ops) == 4 * model.config.num_hidden_layers
    fused_inputs = [
        n
        for n in gm.graph.find_nodes(op="placeholder")
        if getattr(n, "_dynamo_source", None) is not None and ".fused._buffers" in n._dynamo_source.name
    ]
    # qweight, scales, qzeros (+ bias: Qwen2's q/k/v) of 2 groups per layer
    assert len(fused_inputs) == model.config.num_hidden_layers * (4 + 3)
    assert all(n.meta["tensor_dict"].get("_dynamo_static_input_type") for n in fused_inputs)
    # the compiled step leaves no slice behind (a CUDA graph's outputs are overwritten by its next replay)
    assert all(g.active and g._outs is None and g._x is None for g in groups(model))
    # through AOT autograd too (functionalized views of the custom op's output), with packed GQA attention
    torch._dynamo.reset()
    options = LoopOptions(compile=True, backend="aot_eager", fuse=True, packed_gqa=True)
    assert torch.equal(generate(model, ids, 10, eos_token_id=(), options=options), ref)
    assert not decoder(model).graph_breaks and decoder(model).stats["packed_gqa"]
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_pretrained_bytes_identical_and_unfuse_restores(checkpoints, family, tmp_path):
    model = _load(checkpoints[family])
    ids = _ids()
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path / "before")
    fuse_siblings(model)
    model.save_pretrained(tmp_path / "after")
    names = sorted(p.name for p in (tmp_path / "before").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "after").iterdir()) and "model.safetensors" in names
    for name in names:
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes(), name
    # torch.save of the state dict: same tensors back (its file stores the shared storage once)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    back = torch.load(io.BytesIO(buf.getvalue()))
    assert all(torch.equal(back[k], v) for k, v in _load(checkpoints[family]).state_dict().items())

    assert unfuse(model) == 2 * model.config.num_hidden_layers
    assert not groups(model)
    for m in model.modules():
        if hasattr(m, "qweight"):
            assert m.sibling is None
            assert m.qweight.untyped_storage().nbytes() == m.qweight.numel() * 4  # its own storage
    assert torch.equal(_logits(model, ids), ref)
    model.save_pretrained(tmp_path / "unfused")
    assert (tmp_path / "before" / "model.safetensors").read_bytes() == (
        tmp_path / "unfused" / "model.safetensors"
    ).read_bytes()
    assert unfuse(model) == 0  # nothing left to undo


def test_fusing_twice_changes_nothing_and_a_deep_copy_stays_fused(checkpoints):
    import copy

    model = _load(checkpoints["llama"])
    first = fuse_siblings(model)
    ptrs = [g.fused.qweight.data_ptr() for g in groups(model)]
    second = fuse_siblings(model)
    assert second.fused == first.fused and [g.fused.qweight.data_ptr() for g in groups(model)] == ptrs
    twin = copy.deepcopy(model)  # deepcopy keeps views of one storage views of the copied storage
    assert len(groups(twin)) == len(ptrs) and all(g.intact() for g in groups(twin))
    assert groups(twin)[0].members[0] is twin.model.layers[0].self_attn.q_proj
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_logits(twin, ids), _logits(model, ids))


def test_members_with_an_online_rotation_or_other_settings_are_not_fused(checkpoints):
    """A member whose input is transformed (an online rotation: a forward pre-hook) or that differs
    from its siblings stays alone; the model still computes what it computed."""
    from rsq.rotation.online import OnlineRotation, attach_online_rotation

    model = _load(checkpoints["llama"])
    layers = model.model.layers
    # the checkpoint's own rotations sit on o_proj and down_proj, never on a fused member
    assert hasattr(layers[0].self_attn.o_proj, "online_rotation")
    assert hasattr(layers[0].mlp.down_proj, "online_rotation")
    hidden = model.config.hidden_size
    attach_online_rotation(layers[0].self_attn.k_proj, OnlineRotation("self_attn.k_proj", "full", hidden))
    layers[1].mlp.up_proj.bits = 4  # another setting than gate_proj's (only compared, never run)
    ids = _ids()
    report = fuse_siblings(model)
    assert report.skipped == [
        "layer 0: q_proj+k_proj+v_proj (an online rotation or a forward pre-hook on the input)",
        "layer 1: gate_proj+up_proj (different bits)",
    ]
    assert report.fused == ["layer 0: gate_proj+up_proj", "layer 1: q_proj+k_proj+v_proj"]
    layers[1].mlp.up_proj.bits = 3
    got = _logits(model, ids)
    unfuse(model)
    ref = _logits(model, ids)
    assert (got - ref).abs().max() <= LOGIT_TOL * ref.abs().max()
    for m in model.modules():
        if hasattr(m, "online_rotation"):
            assert m.sibling is None


def test_siblings_called_on_different_inputs_compute_their_own(checkpoints):
    """The fallback: a sibling called with another tensor (or the same one changed in place) gets
    its own product; the group switches itself off with a warning."""
    model = _load(checkpoints["llama"], packed=True)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    alone = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    fuse_siblings(model)
    group = attn.q_proj.sibling[0]
    q = attn.q_proj(x)
    with pytest.warns(UserWarning, match="different inputs"):
        k = attn.k_proj(x.clone())
    v = attn.v_proj(x)
    assert not group.active and group.misses == 1
    for y, want, m in zip((q, k, v), alone, (attn.q_proj, attn.k_proj, attn.v_proj)):
        assert ((y.double() - want.double()).abs() <= _bound(x, m.dequantize_weight(), m.bias)).all()
    # the same tensor changed in place between two siblings
    mlp = model.model.layers[0].mlp
    h = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    gate = mlp.gate_proj(h)
    h.mul_(2)
    with pytest.warns(UserWarning, match="different inputs"):
        up = mlp.up_proj(h)
    unfuse(model)
    assert torch.equal(up, mlp.up_proj(h))  # computed alone either way
    w = mlp.gate_proj.dequantize_weight()
    assert ((gate.double() - mlp.gate_proj(h / 2).double()).abs() <= _bound(h / 2, w, None)).all()
    # fusing again switches the group back on
    assert fuse_siblings(model).skipped == [] and all(g.active for g in groups(model))


def test_moving_a_fused_model_switches_fusion_off(checkpoints):
    """model.to copies each buffer alone (the views are gone): the next eager call notices, warns
    and computes each member alone; fuse_siblings fuses the moved model again."""
    model = _load(checkpoints["mistral"], packed=True)
    ids = _ids()
    fuse_siblings(model)
    model.to(torch.float64)
    with pytest.warns(UserWarning, match="moved"):
        got = _logits(model, ids)
    assert not any(g.active for g in groups(model))
    unfuse(model)
    ref = _logits(model, ids)
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()  # float64 now
    assert fuse_siblings(model).skipped == []
    assert (_logits(model, ids) - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_cli_fuse_and_packed_gqa_print_the_same_text(checkpoints, capsys, monkeypatch):
    """`rsq generate --loop rsq --fuse --packed-gqa` (the CUDA defaults, forced on the CPU) prints
    what `--no-fuse --no-packed-gqa` prints (greedy, the tokenizer's EOS), and did fuse."""
    from rsq.cli.main import main
    from rsq.generation import fusion

    reports = []
    real = fusion.fuse_siblings
    monkeypatch.setattr(fusion, "fuse_siblings", lambda model: reports.append(real(model)) or reports[-1])
    texts = []
    for flags in (["--no-fuse", "--no-packed-gqa"], ["--fuse", "--packed-gqa"]):
        argv = ["generate", str(checkpoints["mistral"]), "The tower is", "--max-new-tokens", "12", "--loop", "rsq"]
        assert main(argv + flags) == 0
        texts.append(capsys.readouterr().out)
        assert len(reports) == (flags[0] == "--fuse")
    assert texts[0] == texts[1] and texts[0].strip()
    assert len(reports[0].fused) == 4 and not reports[0].skipped


def test_fusable_only_for_quantized_models_of_known_families(checkpoints):
    assert fusable(_load(checkpoints["qwen2"]))
    assert not fusable(tiny_model("llama"))  # no quantized linears
    assert not fusable(torch.nn.Linear(2, 2))


def test_forgetting_converted_layers_of_replaced_buffers():
    from rsq.kernels import humming_backend

    a, b, c, d = (torch.zeros(2) for _ in range(4))
    key = humming_backend._key(a, b, c, None)
    humming_backend._LAYERS[key] = ((a, b, c, None), "layer")
    try:
        humming_backend.forget(d)
        assert key in humming_backend._LAYERS
        humming_backend.forget(d, b)
        assert key not in humming_backend._LAYERS
    finally:
        humming_backend._LAYERS.pop(key, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "mistral"])  # hidden 64: the Triton kernels' widths
def test_cuda_fused_products_and_default_generation(checkpoints, family):
    """On CUDA (bf16, the format's GPU backends: Triton GEMV at 1 token, humming or Triton tiles at
    more): each slice within bf16 rounding of the member's own product (relative 1e-2, the humming
    probe's tolerance), and rsq.generate's default (fused, packed GQA, compiled, CUDA graphs) gives
    greedy tokens of the unfused eager model without skipping a CUDA graph."""
    from torch._dynamo.utils import counters

    import rsq

    model, _ = rsq.load(checkpoints[family], device="cuda", dtype=torch.bfloat16)
    fuse_siblings(model)
    for m_tokens in (1, 16):
        x = torch.randn(m_tokens, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        for group in groups(model):
            outs = [m(x).float() for m in group.members]
            group.active = False
            for m, y in zip(group.members, outs):
                alone = m(x).float()
                assert (y - alone).norm() <= 1e-2 * alone.norm()
            group.active = True
    ids = _ids(2).cuda()
    torch._dynamo.reset()
    counters.clear()
    out = generate(model, ids, 16, eos_token_id=())
    stats = decoder(model).stats
    assert stats["compiled"] and stats["fused"] == 2 * model.config.num_hidden_layers and stats["packed_gqa"]
    assert counters["inductor"]["cudagraph_skips"] == 0 and not decoder(model).graph_breaks
    unfuse(model)
    with torch.no_grad():
        logits = model(input_ids=out[:, :-1]).logits.float()[:, PROMPT - 1 :]
    best = logits.max(-1).values
    chosen = logits.gather(-1, out[:, PROMPT:, None])[..., 0]
    assert (chosen >= best - 2e-2 * best.abs().max()).all()  # bf16 kernels differ in the last bits
