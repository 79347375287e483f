"""`rsq generate`: text from a checkpoint, greedy or sampled (argparse wiring, printing)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace

import torch

from rsq.errors import CheckpointFormatError, ConfigError
from rsq.eval.longctx import encode_prompt
from rsq.generation import LoopOptions, Sampling, compile_by_default, decode_kwargs, decoder
from rsq.generation import generate as rsq_generate
from rsq.io.hf import load_any
from rsq.models.device import resolve_device


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from an rsq checkpoint (or a plain model directory)",
        description="Load DIR with rsq.load (plain Hugging Face directories load as they are), "
        "continue PROMPT and print the new text. Greedy unless --temperature > 0.",
    )
    p.add_argument("ckpt", metavar="DIR", help="rsq checkpoint directory (rsq quantize --out ...)")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap PROMPT as one user turn with the tokenizer's chat template",
    )
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument(
        "--dense",
        action="store_true",
        help="replace the packed linears by nn.Linear modules holding W_hat (same function; plain "
        "torch modules, e.g. for torch.compile); off the GPU kernels the default already "
        "dequantizes once",
    )
    add_packed_option(p)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static KV cache + torch.compile'd decode step (CUDA graphs on a GPU), 8-10x eager's tokens/s on "
        "a GPU; greedy tokens equal the eager path's; the first call compiles (warm-up reported once) "
        "(default: on for CUDA, off on the CPU; --no-compile: eager decoding)",
    )
    p.add_argument(
        "--loop",
        choices=("rsq", "hf"),
        default=None,
        help="rsq: rsq's own decode loop (rsq.generation.generate: static cache sized to the call, no host "
        "sync per token); hf: transformers' generate (with --no-compile, its dynamic cache) "
        "(default: rsq on CUDA, hf on the CPU)",
    )
    p.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rsq loop: compute q/k/v and gate/up as one quantized GEMM each (same weights; default: on for CUDA)",
    )
    p.add_argument(
        "--packed-gqa",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rsq loop: one-token attention over the unrepeated K/V heads of a GQA model (default: on for CUDA)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=cmd_generate)


def add_packed_option(p) -> None:
    p.add_argument(
        "--packed",
        action="store_true",
        help="off the GPU kernels (CPU, or no Triton), dequantize packed weights on every call (the "
        "reference path) instead of once at the first forward (the default; same function, more memory)",
    )


class StepClock:
    """A transformers streamer that only records when ``generate`` hands over each step's tokens
    (the first call: the prompt; then one call per new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def summary(self) -> str | None:
        """'first decode step X s, then Y tokens/s' (None with fewer than 4 tokens)."""
        t = self.times
        if len(t) < 5:  # prompt, first token, first decode step, two more
            return None
        rate = (len(t) - 3) / (t[-1] - t[2])
        first = f"prefill + first token {t[1] - t[0]:.2f} s, first decode step {t[2] - t[1]:.1f} s"
        return f"{first}, then {rate:.1f} tokens/s"


def loop_summary(stats: dict) -> str | None:
    """The rsq loop's timings (rsq.generation.generate's ``stats``) as StepClock.summary words."""
    if not stats or stats.get("steps", 0) < 2:
        return None
    rate = stats["steps"] / stats["decode_s"]
    first = f"prefill + first token {stats['prefill_s']:.2f} s, first decode step {stats['first_step_s']:.1f} s"
    if stats.get("compiled") and stats.get("new_cache"):
        # a process's first call: the prefill converts and JIT-compiles the quantized layers' GEMMs
        # (humming on a GPU), the first step compiles the step and captures its CUDA graph
        first += " (one-time: kernel JIT + layer conversion in the prefill, compilation + graph capture in the step)"
    return f"{first}, then {rate:.1f} tokens/s"


@dataclass(frozen=True)
class GenerateOptions:
    """How :func:`generate` decodes. ``compile``: static cache + compiled decode step
    (rsq.generation.decode_kwargs, with ``compile_backend`` and ``fullgraph``)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    chat: bool = False
    ignore_eos: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    fullgraph: bool = False
    loop: str = "hf"
    fuse: bool | None = None  # rsq loop: LoopOptions.fuse
    packed_gqa: bool | None = None  # rsq loop: LoopOptions.packed_gqa


def generate(
    model,
    tokenizer,
    prompt: str,
    options: GenerateOptions | None = None,
    *,
    clock: StepClock | None = None,
    stats: dict | None = None,
    **fields,
) -> tuple[list[int], str]:
    """(new token ids, their text without special tokens) continuing ``prompt`` (batch of one), as
    ``options`` (:class:`GenerateOptions`; ``fields`` replace some of its fields) say.
    ``options.loop``: "rsq" (rsq.generation.generate; ``stats`` gets its timings) or "hf"
    (transformers' generate; ``compile``: static cache + compiled decode step,
    rsq.generation.decode_kwargs; ``clock`` records when each token arrives, :class:`StepClock`)."""
    opts = replace(options or GenerateOptions(), **fields)
    max_new_tokens, temperature, chat = opts.max_new_tokens, opts.temperature, opts.chat
    if opts.loop not in ("rsq", "hf"):
        raise ConfigError(f"--loop must be rsq or hf, got {opts.loop!r}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {temperature}")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat: the checkpoint's tokenizer has no chat template; drop --chat")
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt, chat)], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=None, top_k=None)
        if temperature > 0
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    if opts.loop == "rsq":
        gen = torch.Generator(device).manual_seed(opts.seed) if temperature > 0 else None
        out = rsq_generate(
            model,
            ids,
            max_new_tokens,
            eos_token_id=() if opts.ignore_eos else None,
            pad_token_id=pad,
            sampling=Sampling(temperature, generator=gen),
            options=LoopOptions(
                compile=opts.compile,
                backend=opts.compile_backend,
                timed=stats is not None,
                fuse=opts.fuse,
                packed_gqa=opts.packed_gqa,
            ),
        )
        if stats is not None:
            stats.update(decoder(model).stats)
        new = out[0, ids.shape[1] :].tolist()
        return new, tokenizer.decode(new, skip_special_tokens=True)
    fast = decode_kwargs(device, opts.compile, backend=opts.compile_backend, fullgraph=opts.fullgraph)
    if temperature > 0:
        torch.manual_seed(opts.seed)  # HF sampling draws from the global generator
    with torch.no_grad():
        out = model.generate(
            streamer=clock,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if opts.ignore_eos else None,
            num_beams=1,
            pad_token_id=pad if pad is not None else 0,
            **sampling,
            **fast,
        )
    new = out[0, ids.shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def cmd_generate(args) -> int:
    model, tokenizer = load_any(args.ckpt, packed=args.packed)
    if tokenizer is None:
        raise CheckpointFormatError(f"{args.ckpt} has no tokenizer files: copy the base model's tokenizer into it")
    if args.dense:
        from rsq.checkpoint.dense import dequantize_once  # nn.Linear for packed ones: loads the kernels

        dequantize_once(model, keep_packed=False)
    device = resolve_device(args.device)
    model.to(device)
    compile = compile_by_default(device) if args.compile is None else args.compile
    loop = args.loop or ("rsq" if device.type == "cuda" else "hf")
    if compile:
        print(
            f"[{loop} loop, static cache, compiled decoding (--no-compile: eager); the first step compiles]",
            file=sys.stderr,
        )
    clock = StepClock() if loop == "hf" else None
    stats: dict = {}
    t0 = time.perf_counter()
    new, text = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        chat=args.chat,
        ignore_eos=args.ignore_eos,
        compile=compile,
        clock=clock,
        loop=loop,
        fuse=args.fuse,
        packed_gqa=args.packed_gqa,
        stats=stats if loop == "rsq" else None,
    )
    seconds = time.perf_counter() - t0
    print(text)
    steps = clock.summary() if clock is not None else loop_summary(stats)
    print(f"[{len(new)} tokens in {seconds:.1f} s{'; ' + steps if steps else ''}]", file=sys.stderr)
    return 0
