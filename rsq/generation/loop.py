"""rsq's own decode loop: prefill once, then a compiled one-token step replayed per new token, with
no host synchronisation per token (the gpt-fast pattern).

transformers' ``generate`` spends about 4 ms of host time per token on an H100 (input preparation,
logits processors, stopping criteria that read the GPU every token, dynamo guards, cache
bookkeeping), as long as the 4-bit 8B model's whole weight read; it caps the speed-up of small
weights (issue 29). This loop keeps per token only: the compiled step (the model's forward on one
token, the greedy argmax), the copy of the token into a preallocated output buffer and, with an end
of sequence token, three small tensor ops. The host reads the GPU once every ``eos_every`` tokens.

* The KV cache is a transformers ``StaticCache`` of ``cache_length(prompt + new)`` positions
  (rounded up to ``cache_multiple``, 256): calls whose lengths round to the same size reuse the cache
  and the compiled step (one per batch size and cache length), and no call attends over a cache much
  longer than it needs (transformers' ``generate`` reuses a longer cache a previous call left).
* Prefill is one eager forward over the prompt (its length varies; ``compile_prefill`` compiles
  it with dynamic shapes); the step is
  ``torch.compile(mode="reduce-overhead")`` on CUDA (CUDA graphs), eager elsewhere unless asked.
* Greedy tokens equal transformers' ``generate(do_sample=False)`` (tests/unit/test_generation_loop.py,
  batch 1 and 3, left padding and EOS included). Sampling (temperature, top-k, top-p) draws with an
  exponential race (argmax of p / Exp(1)), which needs no host synchronisation; its draws differ
  from transformers' for the same seed.
* Batched prompts of different lengths: left padding with ``attention_mask`` (as transformers').

Works on a model from ``rsq.load`` and on any transformers causal LM whose forward takes a cache
and ``position_ids`` (the bf16 baseline of bench/generate_speed.py runs the same loop).
"""

from __future__ import annotations

import inspect
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rsq.errors import ConfigError
from rsq.generation import attention, fusion
from rsq.generation.settings import compile_by_default
from rsq.models.adapter import config_head_dim, config_kv_heads

CACHE_MULTIPLE = 256
EOS_EVERY = 16


def cache_length(needed: int, multiple: int = CACHE_MULTIPLE) -> int:
    """Positions of the static cache for ``needed`` = prompt + new tokens: the next multiple of
    ``multiple`` (calls of similar length share one cache and one compiled step)."""
    return -(-needed // multiple) * multiple


@dataclass
class Decoder:
    """One model's decoding state: its static cache (reused while batch, length, dtype and device
    match) and its compiled step (one per compile setting)."""

    cache: object | None = None
    key: tuple | None = None  # (batch, cache_len, dtype, device) of ``cache``
    step: Callable | None = None
    step_key: tuple | None = None  # (compile, backend, fullgraph, sample, cuda_graphs)
    allocations: int = 0  # caches allocated so far
    graph_breaks: bool = False  # the step did not compile as one graph: compiled with breaks
    prefill: Callable | None = None  # the compiled prefill (LoopOptions.compile_prefill)
    prefill_key: tuple | None = None  # (backend, sample) of ``prefill``
    stats: dict | None = None  # the last call's: cache_len, new_cache, compiled, new_tokens (+ timings)


_DECODERS: weakref.WeakKeyDictionary[nn.Module, Decoder] = weakref.WeakKeyDictionary()


def decoder(model: nn.Module) -> Decoder:
    """The :class:`Decoder` of ``model`` (created on first use; dropped with the model)."""
    if model not in _DECODERS:
        _DECODERS[model] = Decoder()
    return _DECODERS[model]


def _forward_names(model: nn.Module) -> tuple[str, bool]:
    """(the forward's keyword for the cache, whether it takes ``cache_position``): transformers 5.0
    takes ``past_key_values`` + ``cache_position``; later 5.x ``past_key_values`` or ``cache``."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    if name not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"{type(model).__name__}.forward takes no KV cache: use transformers' generate (--loop hf)")
    return name, "cache_position" in params


def _static_cache(model: nn.Module, length: int):
    from transformers import StaticCache

    # allocated by the prefill's first update (lazily: heads, dtype and device from the states)
    return StaticCache(config=model.config, max_cache_len=length)


def _cache_for(
    dec: Decoder, model: nn.Module, batch: int, needed: int, multiple: int, device, dtype, early: bool = False
):
    """The decoder's static cache for ``batch`` x ``needed`` tokens (reused, reset, when it fits).
    ``early``: allocate its tensors now, outside any compiled region (a compiled prefill would
    otherwise allocate them inside its graph, where transformers cannot mark them as static
    addresses, and the CUDA-graph decode step then skips its graphs: "mutated inputs")."""
    length = cache_length(needed, multiple)
    key = (batch, length, dtype, device)
    if dec.cache is not None and dec.key == key:
        dec.cache.reset()
        return dec.cache, length
    dec.cache = dec.key = None  # free the old one before allocating
    dec.cache = _static_cache(model, length)
    if early and hasattr(dec.cache, "early_initialization"):
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        dec.cache.early_initialization(batch, config_kv_heads(cfg), config_head_dim(cfg), dtype, device)
    dec.key = key
    dec.allocations += 1
    return dec.cache, length


def _make_step(
    model: nn.Module,
    sample: bool,
    compile: bool,
    backend: str,
    fullgraph: bool,
    device,
    cuda_graphs: bool = True,
    dynamic: bool = False,
) -> Callable:
    cache_name, wants_cache_position = _forward_names(model)

    def step(tokens, position_ids, cache_position, attention_mask, cache):
        kw = {cache_name: cache}
        if wants_cache_position:
            kw["cache_position"] = cache_position
        out = model(
            input_ids=tokens,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=1,
            **kw,
        )
        logits = out.logits[:, -1, :]
        return logits.float() if sample else torch.argmax(logits, dim=-1)

    if not compile:
        return step
    from torch import _dynamo

    # one compiled step per (model, batch, cache length): dynamo keys them all on one code object
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(_dynamo.config, name):
            setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), 64))
    mode = "reduce-overhead" if _graphs(True, backend, device, cuda_graphs) else None
    return torch.compile(step, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)


def _prefill_fn(dec: Decoder, model: nn.Module, sample: bool, options, device) -> Callable:
    """The prompt's forward: eager, or with ``options.compile_prefill`` compiled once per model
    (dynamic shapes, so prompts of any length share it; no CUDA graphs; graph breaks allowed)."""
    if not options.compile_prefill:
        return _make_step(model, sample, False, options.backend, False, device)
    key = (options.backend, sample)
    if dec.prefill is None or dec.prefill_key != key:
        dec.prefill = _make_step(model, sample, True, options.backend, False, device, cuda_graphs=False, dynamic=True)
        dec.prefill_key = key
    return dec.prefill


def _fusion(model: nn.Module, device: torch.device, fuse: bool | None) -> int:
    """Fuse (or, with ``fuse=False``, unfuse) the sibling projections of a quantized model of a
    family rsq knows (None: fuse on CUDA); the fused groups active now."""
    if fuse is False:
        fusion.unfuse(model)
        return 0
    if fuse or (fuse is None and device.type == "cuda"):
        if fusion.fusable(model):
            fusion.fuse_siblings(model)
    return sum(g.active for g in fusion.groups(model))


def _graphs(compile: bool, backend: str, device, cuda_graphs: bool = True) -> bool:
    """Whether the compiled step replays as CUDA graphs (inductor's mode="reduce-overhead" on CUDA)."""
    return cuda_graphs and compile and backend == "inductor" and torch.device(device).type == "cuda"


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy (argmax); > 0 samples after top-k
    and top-p (None: off), drawing from ``generator`` (None: the device's default)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class LoopOptions:
    """``compile``: None = on CUDA with Triton (CUDA graphs, ``mode="reduce-overhead"``); True off
    CUDA compiles without graphs; False = eager. ``fullgraph``: the step compiles whole or fails.
    ``eos_every``: tokens between the host's reads of the end-of-sequence flags.
    ``cache_multiple``: the static cache holds prompt + new tokens rounded up to this.
    ``timed``: record prefill / first step / decode seconds in ``decoder(model).stats`` (three
    device synchronisations per call). ``fuse``: compute q/k/v and gate/up of a quantized model as
    one GEMM each (:func:`rsq.generation.fusion.fuse_siblings`, in place; None = on CUDA; False
    undoes a fusion). ``packed_gqa``: decode attention over the unrepeated K/V heads of a GQA model
    (:mod:`rsq.generation.attention`, for the call only; None = on CUDA). ``cuda_graphs``: False
    compiles the step on CUDA without CUDA graphs (plain inductor: every kernel launched from the
    host; for profiling and debugging, slower). ``compile_prefill``: compile the prompt's forward
    too (dynamic shapes: one compilation per model for prompts of any length, paid at the first
    call; no CUDA graphs), which removes the eager forward's per-operator host time from the
    prefill; off by default."""

    compile: bool | None = None
    fuse: bool | None = None
    packed_gqa: bool | None = None
    backend: str = "inductor"
    fullgraph: bool = True
    eos_every: int = EOS_EVERY
    cache_multiple: int = CACHE_MULTIPLE
    timed: bool = False
    cuda_graphs: bool = True
    compile_prefill: bool = False


def _eos_ids(model: nn.Module, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def _pad_id(model: nn.Module, pad_token_id, eos: Sequence[int]) -> int:
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return int(pad_token_id)


def _check(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling, options: LoopOptions):
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if sampling.temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {sampling.temperature}")
    if options.eos_every < 1 or options.cache_multiple < 1:
        raise ConfigError("eos_every and cache_multiple must be >= 1")
    param = next(model.parameters())
    if param.device != input_ids.device:
        raise ConfigError(
            f"input_ids are on {input_ids.device}, the model on {param.device}: move them with .to(model.device)"
        )


def _check_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The 0/1 mask as bool, None when it masks nothing; refuses right padding."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: pass one "
            "mask entry per prompt token"
        )
    mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    if bool(mask.all()):
        return None
    # left padding: once a row's real tokens start, they continue to its end
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()) or not bool(mask[:, -1].all()):
        raise ConfigError("attention_mask: pad prompts on the left (tokenizer.padding_side = 'left'), not the right")
    return mask


def _pick(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """A token per row from float logits: temperature, then top-k, then top-p (transformers' order),
    drawn as argmax(p / Exp(1)) (no host synchronisation, unlike ``torch.multinomial``)."""
    logits = logits / sampling.temperature
    top_k, top_p = sampling.top_k, sampling.top_p
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=sampling.generator)
    return torch.argmax(probs / race, dim=-1)


class _Tokens:
    """The output buffer (prompt + new tokens, on the device), the step's one-token input, and the
    end-of-sequence state: rows that ended (``done``) and, per step, whether all had (``all_done``)."""

    def __init__(self, input_ids: torch.Tensor, max_new_tokens: int, eos: list[int], pad: int, sampling: Sampling):
        batch, self.prompt = input_ids.shape
        device = input_ids.device
        self.out = torch.empty(batch, self.prompt + max_new_tokens, dtype=input_ids.dtype, device=device)
        self.out[:, : self.prompt] = input_ids
        self.current = torch.empty(batch, 1, dtype=input_ids.dtype, device=device)  # fixed strides
        self.eos = torch.tensor(eos, device=device, dtype=input_ids.dtype) if eos else None
        self.pad, self.sampling = pad, sampling
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.all_done = torch.zeros(max_new_tokens, dtype=torch.bool, device=device)

    def take(self, t: int, y: torch.Tensor) -> None:
        """Record new token ``t`` from the step's output ``y`` (tokens, or float logits to sample)."""
        tok = _pick(y, self.sampling) if self.sampling.temperature > 0 else y
        if self.eos is not None:
            tok = torch.where(self.done, self.pad, tok)
            self.done.logical_or_(torch.isin(tok, self.eos))
            self.all_done[t] = self.done.all()
        self.out[:, self.prompt + t] = tok
        self.current[:, 0] = tok

    def ended_before(self, t: int) -> bool:
        """Whether every row has ended within the first ``t`` new tokens (reads the device)."""
        return self.eos is not None and bool(self.all_done[:t].any())

    def result(self, max_new_tokens: int) -> torch.Tensor:
        n = max_new_tokens
        if self.eos is not None:
            ended = torch.nonzero(self.all_done).flatten()
            if ended.numel():
                n = int(ended[0]) + 1
        return self.out[:, : self.prompt + n]


def _positions(mask: torch.Tensor | None, batch: int, prompt: int, length: int, device):
    """(prompt position ids, the (batch, cache length) attention mask or None), as transformers
    computes positions: real tokens count from 0, pads sit at 1."""
    if mask is None:
        return torch.arange(prompt, device=device).expand(batch, prompt), None
    full = torch.ones(batch, length, dtype=torch.bool, device=device)
    full[:, :prompt] = mask
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1), full


def _clock(device: torch.device, timed: bool) -> Callable[[], float]:
    def now() -> float:
        if timed and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def _first_step(dec: Decoder, model: nn.Module, args: tuple, device) -> torch.Tensor:
    """The call's first step, which compiles the step when it is new: a model whose forward does
    not trace as one graph (fullgraph) is compiled again with graph breaks allowed, once, with a
    warning (tracing fails before anything runs, so the cache is untouched)."""
    compile, backend, fullgraph, sample, cuda_graphs = dec.step_key
    if not (compile and fullgraph) or dec.graph_breaks:
        return dec.step(*args)
    from torch._dynamo.exc import Unsupported

    try:
        return dec.step(*args)
    except Unsupported as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"the decode step does not compile as one graph ({first}); compiling it with graph breaks")
        dec.step = _make_step(model, sample, compile, backend, False, device, cuda_graphs)
        dec.graph_breaks = True
        return dec.step(*args)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    sampling: Sampling | None = None,
    options: LoopOptions | None = None,
) -> torch.Tensor:
    """Prompt + new tokens, (batch, prompt + n) with n <= ``max_new_tokens``: the layout of
    transformers' ``model.generate(input_ids, max_new_tokens=...)``, and its greedy tokens.

    ``attention_mask``: 1 for prompt tokens, 0 for left padding (batched prompts of different
    lengths). ``eos_token_id``: None = the model's generation_config's; ``()`` = none (always
    ``max_new_tokens`` tokens). Rows that ended get ``pad_token_id`` (None: the generation_config's,
    else the first EOS id); generation stops when every row has ended (the host looks every
    ``options.eos_every`` tokens and drops the tokens past that point). ``sampling``: greedy when
    None. ``options``: :class:`LoopOptions`. ``decoder(model).stats`` describes the call after it."""
    sampling, options = sampling or Sampling(), options or LoopOptions()
    _check(model, input_ids, max_new_tokens, sampling, options)
    device = input_ids.device
    compile = compile_by_default(device) if options.compile is None else bool(options.compile)
    mask = _check_mask(attention_mask, input_ids)
    eos = _eos_ids(model, eos_token_id)
    batch, prompt = input_ids.shape
    now = _clock(device, options.timed)

    fused = _fusion(model, device, options.fuse)
    dec = decoder(model)
    before = dec.allocations
    dtype = getattr(model, "dtype", next(model.parameters()).dtype)
    early = options.compile_prefill
    cache, length = _cache_for(dec, model, batch, prompt + max_new_tokens, options.cache_multiple, device, dtype, early)
    sample = sampling.temperature > 0
    step_key = (compile, options.backend, options.fullgraph, sample, options.cuda_graphs)
    if dec.step is None or dec.step_key != step_key:
        dec.step = _make_step(model, sample, compile, options.backend, options.fullgraph, device, options.cuda_graphs)
        dec.step_key = step_key
    positions, full_mask = _positions(mask, batch, prompt, length, device)
    tokens = _Tokens(input_ids, max_new_tokens, eos, _pad_id(model, pad_token_id, eos), sampling)

    gqa = options.packed_gqa if options.packed_gqa is not None else device.type == "cuda"
    t0 = now()
    with torch.no_grad(), attention.use(model, gqa) as packed:
        prefill = _prefill_fn(dec, model, sample, options, device)  # eager unless asked: prompts vary
        prompt_positions = torch.arange(prompt, device=device)
        tokens.take(0, prefill(input_ids.contiguous(), positions, prompt_positions, full_mask, cache))
        t1 = t2 = now()
        position_ids = positions[:, -1:] + 1
        cache_position = torch.full((1,), prompt, dtype=torch.long, device=device)
        ran, graphs = 0, _graphs(compile, options.backend, device, options.cuda_graphs)
        for t in range(1, max_new_tokens):
            if t % options.eos_every == 0 and tokens.ended_before(t):
                break
            args = (tokens.current, position_ids, cache_position, full_mask, cache)
            if graphs:  # a new CUDA-graph iteration: the last step's outputs are copied already
                torch.compiler.cudagraph_mark_step_begin()
            tokens.take(t, dec.step(*args) if t > 1 else _first_step(dec, model, args, device))
            position_ids.add_(1)
            cache_position.add_(1)
            ran = t
            if t == 1:
                t2 = now()
        out = tokens.result(max_new_tokens)
        t3 = now()
    dec.stats = dict(cache_len=length, new_cache=dec.allocations > before, compiled=compile)
    dec.stats.update(fused=fused, packed_gqa=packed)
    dec.stats.update(new_tokens=out.shape[1] - prompt)
    if options.timed:  # decode_s times the steps after the first (which may compile)
        dec.stats.update(prefill_s=t1 - t0, first_step_s=t2 - t1, decode_s=t3 - t2, steps=max(0, ran - 1))
    return out
