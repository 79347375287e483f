"""Generation speed of rsq checkpoints against the bf16 model they replace (tokens/s, same run).

    python3 bench/generate_speed.py [--work /tmp/rsq-gen] [--layers 32] [--formats 4,3,e8p]
        [--batches 1,16,64] [--new 128] [--prompt 32] [--ttft 2048] [--loop rsq,hf] [--fuse on,off]
        [--packed-gqa on,off]        [--eager] [--json FILE]

1. Builds a Llama-3-8B-shaped model (rsq's bundled config, no download) with random N(0, 0.02)
   weights in bf16 on the GPU; --layers keeps fewer decoder layers.
2. For each format writes a real rsq checkpoint to WORK/<format> with rsq's own writer (one shard per
   decoder layer, rsq.checkpoint.save.write_layer_shard + save_checkpoint): uniform 4 and 3 bits per
   channel (--group-size for grouped) are rsq's RTN of the random weights (rsq.solver.gptq.rtn_result,
   method "rtn", no rotation); E8P ("e8p", 2 bits) stores uniformly random 16-bit codeword indices
   (every index is a codeword; RTN onto E8P of 7 B weights takes minutes, and speed does not depend on
   which codewords), with sigma from the weights. Every linear of every decoder layer is quantized;
   embeddings, norms and lm_head stay bf16 (what rsq quantize does). --online-block N records export's
   online down_proj rotation (blocks of N) in each checkpoint, so ``rsq.load`` attaches it as it does
   for a rotated `export` checkpoint (the weights are not rotated: the same speed, not the same
   function).
3. Loads each checkpoint with ``rsq.load(DIR, device="cuda")``; the bf16 model is the in-memory one
   (the same weights ``from_pretrained`` would load).
4. For every batch size, for bf16 and each checkpoint, and for each decode loop of --loop (a comma
   list; default rsq):
   * ``rsq``: rsq's own loop, ``rsq.generation.generate`` (StaticCache sized to prompt + new rounded
     up to 256, eager prefill, the one-token step compiled with mode="reduce-overhead" (CUDA
     graphs), no host sync per token);
   * ``hf``: transformers ``generate`` with ``rsq.generation.decode_kwargs(device, True)`` (static
     cache + torch.compile'd decode step, CUDA graphs).
   Greedy, --new tokens forced (EOS ignored), a --prompt-token random prompt; the first call (compile
   + capture) is reported as warm-up, a second is discarded, the third is timed. tokens/s = batch x
   new / wall time of that call (its prefill included); for the rsq loop, ``step_ms`` is the mean
   time of the decode steps after the first (rsq.generation's timed stats, a fourth call). --eager
   times eager decoding instead (hf: the dynamic cache; rsq: the step uncompiled); --compile-prefill
   compiles the rsq loop's prefill too (LoopOptions.compile_prefill, every model, bf16 included).
5. Time to first token, measured after every decode measurement (a 2048-token prompt leaves a
   static cache of that size behind in transformers' generate, which later calls would attend
   over): ``generate(max_new_tokens=1)`` on a --ttft-token prompt, batch 1, median of 3 after one
   warm-up, with the first loop of --loop.

--fuse (a comma list of on/off; default on): each rsq checkpoint is timed with its sibling
projections fused (q/k/v and gate/up as one GEMM each, rsq.generation.fuse_siblings; what the rsq
loop does on CUDA by default) and/or unfused (rsq.generation.unfuse), in the same run, for both
loops; with both, the rows are "<format> fused" and "<format> unfused" and a last table gives
fused / unfused tokens/s. --packed-gqa (on/off list; default on): decode attention over the
unrepeated K/V heads (rsq.generation.attention, the rsq loop's default on CUDA) or transformers'
sdpa (K/V repeated per query head), for every model, bf16 included; with both, each setting has its
own rows ("... packed-gqa" / "... repeat-kv") and ratios are to bf16 with the same setting. TTFT and
--profile use each model's first setting.

Ratios are to bf16 measured in the same run with the same loop. A --deadline (seconds) stops starting new measurements;
what was measured is printed and written to --json. --profile FILE writes a torch.profiler table of
one decode (the first batch size, each model) to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_BENCH))


def build_model(shape: str, layers: int | None, device: str):
    from transformers import AutoModelForCausalLM

    from rsq.models.bundled import load_bundled_config

    config = load_bundled_config(shape)
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    return model.eval().requires_grad_(False)


def _config(fmt: str, group_size: int):
    from rsq.config import RSQConfig

    if fmt == "e8p":
        return RSQConfig.for_method("rtn", grid={"kind": "e8p", "bits": 2}, dtype="bfloat16")
    return RSQConfig.for_method("rtn", grid={"bits": int(fmt), "group_size": group_size}, dtype="bfloat16")


def write_checkpoint(model, fmt: str, group_size: int, out: Path, online_block: int = 0) -> float:
    """rsq checkpoint of ``model`` in ``fmt`` written into ``out`` (see the module docstring); seconds.
    ``online_block`` > 0: the checkpoint records export's online down_proj rotation (a block-diagonal
    Hadamard of that block), which ``rsq.load`` attaches as it does for a rotated checkpoint."""
    from rsq.checkpoint.save import save_checkpoint, write_layer_shard
    from rsq.models.registry import resolve
    from rsq.solver.gptq import rtn_result
    from rsq.solver.result import QuantResult

    t0 = time.perf_counter()
    cfg = _config(fmt, group_size)
    out.mkdir(parents=True, exist_ok=True)
    adapter = resolve(model.config)
    layers = adapter.get_layers(model)
    names: dict[str, None] = {}
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(1)
    for i, layer in enumerate(layers):
        results = {}
        for rel, mod in layer.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            full = f"{adapter.layers}.{i}.{rel}"
            W = mod.weight
            if fmt == "e8p":
                from rsq.solver.ldlq import e8p_sigma

                sigma = e8p_sigma(W, cfg.grid.e8p_scale)
                codes = torch.randint(0, 1 << 16, (W.shape[0], W.shape[1] // 8), device=W.device, generator=gen)
                scale = torch.tensor([[sigma]], device=W.device)
                res = QuantResult(codes.to(torch.int32), scale, torch.zeros(1, 1, device=W.device), None, 0.0)
            else:
                res = rtn_result(W, cfg.grid, full)
                res.weight = None  # the float32 W_hat is not stored
            results[full] = res
            names[full] = None
        write_layer_shard(layer, i, adapter.layers, len(layers), results, cfg, out)
    rotation = None
    if online_block:
        width = model.config.intermediate_size
        if width % online_block:
            raise SystemExit(f"--online-block {online_block} does not divide the MLP width {width}")
        site = {"module": adapter.down_proj, "kind": "block", "size": width, "head_dim": online_block}
        rotation = {"online": [site]}
    save_checkpoint(model, None, out, cfg, SimpleNamespace(results=names), rotation, streamed=len(layers))
    return time.perf_counter() - t0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def set_fusion(model, fuse: bool | None) -> None:
    """Sibling projections fused (True) or not (False) before a measurement; None: leave as is (bf16)."""
    from rsq.generation import fuse_siblings, unfuse

    if fuse:
        report = fuse_siblings(model)
        if report.skipped:
            print(f"[fuse] not fused: {report.skipped[:3]}{' ...' if len(report.skipped) > 3 else ''}", flush=True)
    elif fuse is False:
        unfuse(model)


def generate_once(model, ids, new: int, loop: str, fast, timed: bool = False, fuse=None, gqa: bool = True):
    """One greedy generation of exactly ``new`` tokens with ``loop``; ``fast``: the hf loop's
    generate kwargs, or the rsq loop's LoopOptions fields (compile, compile_prefill); ``fuse``: the
    rsq loop's fusion setting; ``gqa``: decode attention over unrepeated K/V heads (both loops)."""
    from rsq.generation import attention

    if loop == "rsq":
        from rsq.generation import LoopOptions, generate

        options = LoopOptions(**fast, timed=timed, fuse=fuse, packed_gqa=gqa)
        return generate(model, ids, new, eos_token_id=(), options=options)
    with attention.use(model, gqa):
        return _hf_generate(model, ids, new, fast)


def _hf_generate(model, ids, new: int, fast):
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        num_beams=1,
        pad_token_id=0,
        **fast,
    )


def time_decode(model, batch: int, prompt: int, new: int, loop: str, fast, device, fuse=None, gqa=True) -> dict:
    set_fusion(model, fuse)
    ids = torch.randint(100, 20000, (batch, prompt), device=device)
    times = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = generate_once(model, ids, new, loop, fast, fuse=fuse, gqa=gqa)
        _sync(device)
        times.append(time.perf_counter() - t0)
    assert out.shape == (batch, prompt + new), out.shape
    r = {
        "warmup_s": times[0],
        "seconds": times[2],
        "tokens_per_s": batch * new / times[2],
        "ms_per_step": times[2] / new * 1e3,
    }
    if loop == "rsq":
        from rsq.generation import decoder

        with torch.no_grad():
            generate_once(model, ids, new, loop, fast, timed=True, fuse=fuse, gqa=gqa)
        stats = decoder(model).stats
        r.update(step_ms=stats["decode_s"] / max(stats["steps"], 1) * 1e3, cache_len=stats["cache_len"])
        r["fused_groups"], r["packed_gqa"] = stats.get("fused", 0), stats.get("packed_gqa")
        r["prefill_ms"] = stats["prefill_s"] * 1e3
    return r


def raise_recompile_limits() -> None:
    """One compiled decode step per (model, batch size): more than dynamo's default of 8 recompiles."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def release(model) -> None:
    """Drop the rsq loop's cache of ``model`` (the next call allocates one of its own size)."""
    from rsq.generation import decoder

    dec = decoder(model)
    dec.cache = dec.key = None


def time_ttft(model, prompt: int, loop: str, fast, device, fuse=None, gqa=True) -> float:
    set_fusion(model, fuse)
    ids = torch.randint(100, 20000, (1, prompt), device=device)
    times = []
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            generate_once(model, ids, 1, loop, fast, fuse=fuse, gqa=gqa)
        _sync(device)
        times.append(time.perf_counter() - t0)
    release(model)
    return statistics.median(times[1:])


def profile_decode(model, batch, prompt, new, loop, fast, device, label, path, fuse=None, gqa=True) -> None:
    from torch.profiler import ProfilerActivity, profile

    set_fusion(model, fuse)
    ids = torch.randint(100, 20000, (batch, prompt), device=device)
    with torch.no_grad():
        generate_once(model, ids, new, loop, fast, fuse=fuse, gqa=gqa)  # compiled already: warm
        _sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
        with profile(activities=acts) as prof:
            generate_once(model, ids, new, loop, fast, fuse=fuse, gqa=gqa)
            _sync(device)
    sort = "cuda_time_total" if torch.device(device).type == "cuda" else "cpu_time_total"
    with open(path, "a") as f:
        f.write(f"\n===== {label} ({loop} loop): one generate of {new} tokens, batch {batch} =====\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))


def add_model_args(ap: argparse.ArgumentParser, formats: str, batches: str) -> None:
    """The options that say which models are built and at which batch sizes (this script and
    bench/decode_profile.py)."""
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--work", default="/tmp/rsq-gen")
    ap.add_argument("--formats", default=formats, help="comma list of 2/3/4/8 (uniform) and e8p; bf16 always")
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--batches", default=batches)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument(
        "--online-block",
        type=int,
        default=0,
        help="rsq checkpoints carry export's online down_proj rotation with this block (e.g. 2048 for "
        "Llama-3-8B), as a rotated export checkpoint loads; the weights stay unrotated (speed only). 0: none",
    )


def build_models(args, formats: list[str], device, build: dict, save=lambda: None) -> dict:
    """{"bf16": the random bf16 model, fmt: its RTN checkpoint written under --work and loaded
    with rsq.load, ...}; write/load times and sizes go into ``build``, ``save`` runs after each."""
    import rsq

    t0 = time.perf_counter()
    base = build_model(args.shape, args.layers, device)
    build["bf16_s"] = time.perf_counter() - t0
    models = {"bf16": base}
    for fmt in formats:
        out = Path(args.work) / f"{fmt}-g{args.group_size}"
        build[f"{fmt}_write_s"] = write_checkpoint(base, fmt, args.group_size, out, args.online_block)
        t0 = time.perf_counter()
        models[fmt], _ = rsq.load(out, device=device, dtype=torch.bfloat16)
        build[f"{fmt}_load_s"] = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
        build[f"{fmt}_gb"] = size
        print(f"[{fmt}] written + loaded ({size:.2f} GB on disk)", flush=True)
        save()
    return models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, formats="4,3,e8p", batches="1,16,64")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ttft", type=int, default=2048, help="prompt tokens of the time-to-first-token test (0: skip)")
    ap.add_argument(
        "--loop",
        default="rsq",
        help="comma list of decode loops: rsq (rsq.generation.generate), hf (transformers' generate)",
    )
    ap.add_argument(
        "--fuse",
        default="on",
        help="comma list of on/off: rsq checkpoints with q/k/v and gate/up fused into one GEMM each, and/or not",
    )
    ap.add_argument(
        "--packed-gqa",
        default="on",
        help="comma list of on/off: decode attention over unrepeated K/V heads (all models), and/or transformers' sdpa",
    )
    ap.add_argument("--eager", action="store_true", help="time eager decoding (no compile) instead")
    ap.add_argument(
        "--compile-prefill",
        action="store_true",
        help="rsq loop: compile the prompt's forward too (LoopOptions.compile_prefill; dynamic shapes)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deadline", type=float, default=1e9, help="start no measurement after this many seconds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, help="write a profiler table of one batch-1 decode per model here")
    args = ap.parse_args()

    from rsq.generation import decode_kwargs

    raise_recompile_limits()
    start = time.perf_counter()
    device = args.device
    gpu = torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else "cpu"
    formats = [f for f in args.formats.split(",") if f]
    batches = [int(b) for b in args.batches.split(",")]
    loops = [x for x in args.loop.split(",") if x]
    if not loops or any(x not in ("rsq", "hf") for x in loops):
        ap.error(f"--loop: a comma list of rsq and hf, got {args.loop!r}")
    fuses = [x for x in args.fuse.split(",") if x]
    if not fuses or any(x not in ("on", "off") for x in fuses) or len(set(fuses)) != len(fuses):
        ap.error(f"--fuse: a comma list of on and off, got {args.fuse!r}")
    gqas = [x for x in args.packed_gqa.split(",") if x]
    if not gqas or any(x not in ("on", "off") for x in gqas) or len(set(gqas)) != len(gqas):
        ap.error(f"--packed-gqa: a comma list of on and off, got {args.packed_gqa!r}")
    fast = {
        "rsq": {"compile": not args.eager, "compile_prefill": args.compile_prefill},
        "hf": decode_kwargs(device, not args.eager),
    }
    record = {"gpu": gpu, "torch": torch.__version__, "args": vars(args), "build": {}, "decode": [], "ttft": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=2))

    models = build_models(args, formats, device, record["build"], save)
    base = models["bf16"]

    def late() -> bool:
        return time.perf_counter() - start > args.deadline

    # (row label, model, fusion, packed GQA, the bf16 row of its ratio): per --packed-gqa setting,
    # bf16 once and each checkpoint once per --fuse setting
    variants = []
    for g in gqas:
        gs = "" if len(gqas) == 1 else (" packed-gqa" if g == "on" else " repeat-kv")
        variants.append(("bf16" + gs, base, None, g == "on", "bf16" + gs))
        for fmt in formats:
            for f in fuses:
                label = fmt if len(fuses) == 1 else f"{fmt} {'fused' if f == 'on' else 'unfused'}"
                variants.append((label + gs, models[fmt], f == "on", g == "on", "bf16" + gs))
    first = {v[1]: v for v in reversed(variants)}  # each model's first setting (TTFT, profile)

    for loop in loops:
        for batch in batches:
            for name, model, fuse, gqa, _ in variants:
                if late():
                    break
                r = time_decode(model, batch, args.prompt, args.new, loop, fast[loop], device, fuse, gqa)
                r.update(model=name, batch=batch, loop=loop)
                cuda = torch.device(device).type == "cuda"
                r["gpu_gb_allocated"] = torch.cuda.memory_allocated() / 1e9 if cuda else 0.0
                release(model)
                record["decode"].append(r)
                step = f"; steps alone {r['step_ms']:.2f} ms" if "step_ms" in r else ""
                print(
                    f"[decode {loop}] {name:22s} batch {batch:3d}: {r['tokens_per_s']:8.1f} tokens/s "
                    f"({r['ms_per_step']:.2f} ms/token{step}; first call {r['warmup_s']:.1f} s)",
                    flush=True,
                )
                save()
            if batch == batches[0] and args.profile:
                for name, model, fuse, gqa, _ in first.values():
                    if late():
                        break
                    profile_decode(
                        model, batch, args.prompt, args.new, loop, fast[loop], device, name, args.profile, fuse, gqa
                    )
                    release(model)
    # last: transformers' generate keeps the long prompt's static cache for the calls after it
    if args.ttft:
        for name, model, fuse, gqa, _ in first.values():
            if late():
                break
            record["ttft"][name] = time_ttft(model, args.ttft, loops[0], fast[loops[0]], device, fuse, gqa)
            print(f"[ttft {loops[0]}] {name:22s} {args.ttft} tokens: {record['ttft'][name] * 1e3:.1f} ms", flush=True)
            save()
    save()

    from rsq.kernels import humming_backend

    built = [v[1] is not None for v in humming_backend._LAYERS.values()]
    record["humming_layers"] = {"converted": sum(built), "fell_back": len(built) - sum(built)}
    print(f"humming layers: {record['humming_layers']}")
    save()
    mode = "eager" if args.eager else "static cache + compiled decode"
    for loop in loops:
        rows = {(r["model"], r["batch"]): r for r in record["decode"] if r["loop"] == loop}
        print(f"\nGPU: {gpu}; {loop} loop, {mode}; tokens/s (x bf16, same loop)")
        ttft_col = loop == loops[0] and record["ttft"]
        print("| model | " + " | ".join(f"batch {b}" for b in batches) + (" | TTFT ms |" if ttft_col else " |"))
        print("|---|" + "---|" * (len(batches) + (1 if ttft_col else 0)))
        for name, _, _, _, ref in variants:
            cells = []
            for b in batches:
                r, base = rows.get((name, b)), rows.get((ref, b))
                ratio = f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if r and base else ""
                cells.append("-" if r is None else f"{r['tokens_per_s']:.0f}{ratio}")
            line = f"| {name} | " + " | ".join(cells) + " |"
            if ttft_col:
                t, t0 = record["ttft"].get(name), record["ttft"].get(ref)
                line += " - |" if t is None else f" {t * 1e3:.0f}" + (f" ({t0 / t:.2f}x)" if t0 else "") + " |"
            print(line)
    if set(loops) == {"rsq", "hf"}:
        print("\nrsq loop tokens/s / hf loop tokens/s (same model, same batch)")
        print("| model | " + " | ".join(f"batch {b}" for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        by = {(r["loop"], r["model"], r["batch"]): r["tokens_per_s"] for r in record["decode"]}
        for name, *_ in variants:
            cells = []
            for b in batches:
                a, h = by.get(("rsq", name, b)), by.get(("hf", name, b))
                cells.append("-" if a is None or h is None else f"{a / h:.2f}x")
            print(f"| {name} | " + " | ".join(cells) + " |")
    by = {(r["loop"], r["model"], r["batch"]): r for r in record["decode"]}
    gs = {"on": " packed-gqa", "off": " repeat-kv"} if len(gqas) == 2 else {gqas[0]: ""}
    pairs = []  # (title, [(row, label on, label off)])
    if len(fuses) == 2:
        pairs += [
            (f"fused / unfused{s}", [(fmt, f"{fmt} fused{s}", f"{fmt} unfused{s}") for fmt in formats])
            for s in gs.values()
        ]
    if len(gqas) == 2:
        names = ["bf16"] + [fmt if len(fuses) == 1 else f"{fmt} {x}" for fmt in formats for x in ("fused", "unfused")]
        pairs.append(("packed-gqa / repeat-kv", [(n, f"{n} packed-gqa", f"{n} repeat-kv") for n in names]))
    for loop in loops:
        for title, rows in pairs:
            print(f"\n{loop} loop: {title} tokens/s (same model, same batch; ms per decode step, rsq loop)")
            print("| model | " + " | ".join(f"batch {b}" for b in batches) + " |")
            print("|---|" + "---|" * len(batches))
            for row, on, off in rows:
                cells = []
                for b in batches:
                    a, u = by.get((loop, on, b)), by.get((loop, off, b))
                    if a is None or u is None:
                        cells.append("-")
                        continue
                    both = "step_ms" in a and "step_ms" in u
                    steps = f" ({a['step_ms']:.2f} / {u['step_ms']:.2f} ms)" if both else ""
                    cells.append(f"{a['tokens_per_s'] / u['tokens_per_s']:.2f}x{steps}")
                print(f"| {row} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
