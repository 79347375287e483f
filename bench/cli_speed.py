"""Time the command a user runs: `rsq quantize` on a checkpoint saved on disk, launch to finished output.

    python3 bench/cli_speed.py --shape llama-3-8b --work /tmp/cli-bench [--layers N] [--keep]

1. builds random weights of a bundled shape (rsq/models/configs, e.g. llama-3-8b, qwen2.5-7b,
   qwen2.5-14b) in bf16 on the GPU, `save_pretrained`s them with a tokenizer into WORK/model (skipped
   when it is already there), and frees the GPU;
2. runs `python3 -m rsq quantize WORK/model --method rsq --bits 3 --nsamples 256 --seqlen 4096
   --device cuda --dtype bfloat16 --ppl wikitext2 --max-windows 8 --out WORK/q` as a subprocess,
   exactly as a user would, and measures its wall time from launch to the finished directory and
   its peak resident host memory (the child's ru_maxrss);
3. prints the stage split that the run's results.json records, each stage beside its floor by
   arithmetic (stage_floors: FLOPs at --tflops, bytes at --tbps, the solve at --fp32-tflops), the
   time outside every stage and the loop's waits on the reader and writer threads (io_wait_read,
   io_wait_write), and the GPU peaks; with --baseline-pythonpath DIR the same command with that
   rsq checkout first (e.g. the main branch) runs in the same invocation, and the before/after
   wall and stage times are printed side by side; with --profile FILE the same command runs once more
   under cProfile (not timed: the profiler slows Python-bound parts), the stats go to FILE and the 30
   functions of largest cumulative time are printed (where the fixed costs go: imports, CUDA start-up,
   the ends' rotation).

4. with --llmc-layers L (default 2; 0 skips): builds an L-layer checkpoint of the same shape, and
   times on it, each as a subprocess from launch to its finished directory, (a) the same
   `rsq quantize` command and (b) llm-compressor: `from_pretrained` + `oneshot` (GPTQ, 3-bit
   symmetric per channel, act-order off, the same calibration windows) + `save_pretrained`
   (compressed), and (c) `rsq quantize --method gptq` (the like-for-like method). Prints the
   same-layers ratios (llm-compressor / rsq, for --method rsq and for --method gptq), and beside
   them the extrapolation of llm-compressor's per-layer time to the full depth against rsq's full
   run. --llmc-pythonpath puts llm-compressor's own packages first for that child only (it pins
   another compressed-tensors than rsq's export).

The tokenizer and the calibration text: --tokenizer DIR (any saved Hugging Face tokenizer; its
ids must be below the shape's vocabulary) and --data-dir (wiki.test.raw).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(shape: str, layers: int | None, tokenizer: str, out: Path, device: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rsq.models.bundled import load_bundled_config

    config = load_bundled_config(shape)
    if layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):  # newer transformers check one entry per layer
            config.layer_types = config.layer_types[:layers]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():  # HF init is slow and layer-norm-free; a plain N(0, 0.02) is enough
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    model.save_pretrained(out, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
    print(f"built {shape} ({config.num_hidden_layers} layers, {size:.1f} GB) in {time.perf_counter() - t0:.0f} s")


def stage_floors(config, nsamples: int, seqlen: int, tflops: float, tbps: float, fp32_tflops: float) -> dict:
    """Seconds per stage for the whole model by arithmetic alone: the FLOPs of the stage's products
    at ``tflops`` (dense bf16 tensor-core rate, fp32 accumulation), its unavoidable bytes at
    ``tbps``, and the solver's fp32 arithmetic at ``fp32_tflops``; a stage's floor is the larger of
    its FLOP and byte times. What each stage must compute, per layer over N = nsamples x seqlen
    tokens (the code as of this bench: one pass per sequential group, shared attention output, the
    down_proj inputs kept between the down pass and the propagation):

    importance  q and k projections (pre-quantization weights) + two causal logit passes (row
                log-sum-exp, then column sums) over every head: 2 N d (H + Hkv) hd + 2 N T H hd
    hessian     the group passes' products: q/k/v + causal attention (o's input), o_proj (MLP-in),
                gate + up (down's input); then X^T (w X) per group as hi + lo bf16 products over the
                upper block triangle ((k + 1) / 2k of w^2 with k = min(4, w // 2048) blocks)
    solve       GPTQ of each matrix in fp32: the lazy-batch updates (~out in^2) and the factorization
                of H (~in^3 / 3 each, once per group)
    propagate   down_proj over N tokens (2 N inter d), reading h and down's inputs and writing out
    """
    from rsq.models.registry import resolve

    adapter = resolve(config)
    n, t, layers = nsamples * seqlen, seqlen, config.num_hidden_layers
    d, inter = config.hidden_size, config.intermediate_size
    h, hkv, hd = adapter.num_heads(config), adapter.num_kv_heads(config), adapter.head_dim(config)
    rate, fp32, bw = tflops * 1e12, fp32_tflops * 1e12, tbps * 1e12
    shapes = adapter.linear_shapes(config)

    def triangle(w: int) -> float:
        k = max(1, min(4, w // 2048))
        return (k + 1) / (2 * k)

    importance = 2 * n * d * (h + hkv) * hd + 2 * n * t * h * hd
    passes = 2 * n * d * (h + 2 * hkv) * hd + 2 * n * t * h * hd + 2 * n * h * hd * d + 4 * n * d * inter
    products = sum(2 * 2 * n * w * w * triangle(w) for w in (d, h * hd, d, inter))
    solve_flops = sum(o * i * i for o, i in shapes.values()) + sum(w**3 / 3 for w in (d, h * hd, d, inter))
    propagate = 2 * n * inter * d
    propagate_bytes = 2 * n * (3 * d + inter)  # bf16: h and out (d each, read + write), down's inputs
    per_layer = {
        "importance": importance / rate,
        "hessian": (passes + products) / rate,
        "solve": solve_flops / fp32,
        "propagate": max(propagate / rate, propagate_bytes / bw),
    }
    return {k: v * layers for k, v in per_layer.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (default: the shape's)")
    ap.add_argument("--work", default="/tmp/rsq-cli-bench")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--nsamples", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--extra", default="", help="more rsq quantize options, one string")
    ap.add_argument("--device", default="cuda", help="where weights are built and quantized (cpu: a smoke test)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--llmc-layers", type=int, default=2, help="layers of the llm-compressor comparison (0: none)")
    ap.add_argument("--llmc-pythonpath", default="", help="packages put first for llm-compressor's child only")
    ap.add_argument("--tflops", type=float, default=989.0, help="bf16 dense tensor-core rate for the floors (H100 SXM)")
    ap.add_argument("--tbps", type=float, default=3.35, help="memory bandwidth for the floors, TB/s (H100 SXM)")
    ap.add_argument("--fp32-tflops", type=float, default=67.0, help="fp32 (non-tensor-core) rate for the solve floor")
    ap.add_argument(
        "--baseline-pythonpath",
        default="",
        help="also run the same command with this rsq checkout first on PYTHONPATH (e.g. the main branch), "
        "in this run: the before/after ratio on the same machine",
    )
    ap.add_argument("--profile", default="", help="also run the command under cProfile, stats to this file")
    ap.add_argument("--llmc-child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llmc_child:
        return llmc_child(*args.llmc_child, args)

    work = Path(args.work).resolve()  # the children run in it: every path absolute
    for key in ("data_dir", "tokenizer"):  # local directories made absolute (a hub id stays as it is)
        if Path(getattr(args, key)).exists():
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    model_dir, out = work / "model", work / "q"
    if not (model_dir / "config.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        build(args.shape, args.layers, args.tokenizer, model_dir, args.device)
    quant = run_rsq(model_dir, out, args)
    if quant is None:
        return 1
    wall, peak_host = quant
    res = json.loads((out / "results.json").read_text())
    t = res["timings"]
    print(f"\nwall {wall:.1f} s launch to finished {out}; peak host RSS {peak_host:.1f} GiB")
    for k in ("before_job", "preflight", "load", "tokenize", "rotate", "quantize", "perplexity", "save", "total"):
        print(f"  {k:<11} {t.get(k, 0.0):7.1f} s")
    if "before_job" in t:  # the process's start, imports and parsing; preflight; then the job's total
        rest = wall - t["before_job"] - t.get("preflight", 0.0) - t.get("total", 0.0)
        print(f"  after the job (writing out, process exit) {rest:5.1f} s")
    floors = stage_floors(_config(model_dir), args.nsamples, args.seqlen, args.tflops, args.tbps, args.fp32_tflops)
    print(f"  stage split (floor by arithmetic at {args.tflops:g} TFLOP/s bf16, {args.tbps:g} TB/s, "
          f"{args.fp32_tflops:g} TFLOP/s fp32; see stage_floors)")  # fmt: skip
    stages = t.get("stages") or {}
    for k, v in stages.items():
        floor = floors.get(k)
        beside = f"   floor {floor:6.1f} s  ({v / floor:4.1f}x)" if floor else ""
        print(f"    stage {k:<14} {v:7.1f} s{beside}")
    timed_sum = sum(stages.values())
    outside = t.get("quantize", 0.0) + t.get("rotate", 0.0) - timed_sum
    print(f"    not in any stage {outside:7.1f} s (quantize + rotate - the stages; io_wait_* are the loop's waits)")
    print(f"  GPU peaks (GiB): {res.get('gpu_peak_GiB')}")
    print(f"  perplexity: {res.get('perplexity')}")
    figures = {"wall_s": wall, "peak_host_GiB": peak_host, "timings": t, "gpu": res.get("gpu_peak_GiB")}
    figures["floors_s"] = floors
    if args.baseline_pythonpath:
        figures["baseline"] = baseline = run_baseline(model_dir, work / "q-baseline", args)
        if baseline:
            print(f"\nbaseline ({args.baseline_pythonpath}) wall {baseline['wall_s']:.1f} s -> this checkout "
                  f"{wall:.1f} s: {baseline['wall_s'] / wall:.2f}x")  # fmt: skip
            for k, v in baseline["stages"].items():
                print(f"    stage {k:<14} {v:7.1f} s -> {stages.get(k, 0.0):7.1f} s")
    if args.profile:
        profile_rsq(model_dir, work / "q-profile", args)
    figures["plan"] = plan = predicted(model_dir, args)
    gpu_peak = max((res.get("gpu_peak_GiB") or {}).values(), default=0.0)
    print(
        f"  rsq plan: host {plan['host_streamed_peak_GiB']:.1f} GiB with the activations offloaded (worst case), "
        f"{plan['host_streamed_peak_GiB'] - plan['calib_activations_per_rank_GiB']:.1f} GiB without them; "
        f"measured {peak_host:.1f} GiB. GPU {plan['device_peak_if_activations_on_device_GiB']:.1f} GiB with the "
        f"activations on the device, + {plan['down_inputs_if_kept_GiB']:.1f} GiB where the down_proj inputs are "
        f"kept for the propagation (as many as fit); measured {gpu_peak:.1f} GiB"
    )
    figures["host_memory"] = res.get("host_memory")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    if args.llmc_layers:
        figures["llmc"] = compare_llmc(args, work, wall)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def run_baseline(model_dir: Path, out: Path, args) -> dict | None:
    """The same command with another rsq checkout first on PYTHONPATH (run before this checkout's
    own run would bias nothing: each is a fresh process on the same saved model)."""
    quant = run_rsq(model_dir, out, args, checkout=args.baseline_pythonpath)
    if quant is None:
        return None
    t = json.loads((out / "results.json").read_text())["timings"]
    return {"wall_s": quant[0], "peak_host_GiB": quant[1], "timings": t, "stages": t.get("stages") or {}}


def predicted(model_dir: Path, args) -> dict:
    """`rsq plan`'s figures for this run, from the saved config alone."""
    from transformers import AutoConfig

    from rsq.models.registry import resolve
    from rsq.plan.memory import memory_plan

    config = AutoConfig.from_pretrained(model_dir)
    return memory_plan(config, resolve(config), nsamples=args.nsamples, seqlen=args.seqlen, bits=3)


REPO = Path(__file__).resolve().parents[1]  # this checkout: its rsq is the one timed


def run_timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, int]:
    """Run ``cmd``; (wall seconds, its peak RSS in GiB, exit code). The peak comes from wait4's rusage
    of that child alone (RUSAGE_CHILDREN would report the largest child so far)."""
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    return wall, usage.ru_maxrss / 1024**2, os.waitstatus_to_exitcode(status)


def profile_rsq(model_dir: Path, out: Path, args) -> None:
    """The same `rsq quantize` under cProfile (stats to --profile), and its 30 largest cumulative
    entries printed. CUDA work is asynchronous: its time lands on the calls that wait for it."""
    import pstats

    if run_rsq(model_dir, out, args, prefix=["-m", "cProfile", "-o", str(Path(args.profile).resolve())]) is None:
        return
    print(f"\ncProfile of the same command (stats in {args.profile}):")
    pstats.Stats(args.profile).sort_stats("cumulative").print_stats(30)


def run_rsq(
    model_dir: Path, out: Path, args, method: str = "rsq", checkout: str | Path = REPO, prefix: list[str] = ()
) -> tuple[float, float] | None:
    """`rsq quantize` with the rsq of ``checkout`` (this one by default): first on PYTHONPATH, and the
    child started outside any checkout (``python3 -m`` puts its working directory first)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(str(out) + ".partial", ignore_errors=True)
    cmd = [sys.executable, *prefix, "-m", "rsq", "quantize", str(model_dir), "--method", method, "--bits", "3"]
    cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
    cmd += ["--dtype", "bfloat16", "--ppl", "wikitext2", "--max-windows", "8", "--data-dir", args.data_dir]
    cmd += ["--out", str(out), *args.extra.split()]
    path = os.pathsep.join(p for p in (str(Path(checkout).resolve()), os.environ.get("PYTHONPATH")) if p)
    wall, peak, code = run_timed(cmd, {"PYTHONPATH": path}, cwd=out.parent)
    if code:
        print(f"rsq quantize failed with exit code {code}")
        return None
    return wall, peak


def compare_llmc(args, work: Path, rsq_full_wall: float) -> dict:
    """rsq and llm-compressor on the same L-layer checkpoint, each launch to finished output."""
    from rsq.models.bundled import load_bundled_config

    depth = load_bundled_config(args.shape).num_hidden_layers if not args.layers else args.layers
    layers = args.llmc_layers
    small = work / f"model-{layers}l"
    if not (small / "config.json").is_file():
        small.mkdir(parents=True, exist_ok=True)
        build(args.shape, layers, args.tokenizer, small, args.device)
    rsq_run = run_rsq(small, work / f"q-{layers}l", args)
    gptq_run = run_rsq(small, work / f"q-gptq-{layers}l", args, method="gptq")
    out = work / f"llmc-{layers}l"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--llmc-child", str(small), str(out), "--data-dir", args.data_dir]
    cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--tokenizer", args.tokenizer]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (args.llmc_pythonpath, os.environ.get("PYTHONPATH")) if p)}
    wall, peak, code = run_timed(cmd, env)
    fig = {"layers": layers, "depth": depth, "rsq_s": rsq_run[0] if rsq_run else None}
    fig["rsq_gptq_s"] = gptq_run[0] if gptq_run else None
    if code:
        print(f"llm-compressor failed with exit code {code}: no comparison")
        return {**fig, "llmc_error": code}
    fig.update(llmc_s=wall, llmc_peak_host_GiB=peak)
    # its fixed costs (imports, loading) are scaled with the layers too, so this overstates its full time
    extrapolated = wall / layers * depth
    fig["llmc_extrapolated_s"] = extrapolated
    print(
        f"\nsame {layers} layers, launch to finished output: rsq --method rsq {fig['rsq_s']} s, "
        f"--method gptq {fig['rsq_gptq_s']} s, llm-compressor (GPTQ) {wall:.1f} s"
    )
    if fig["rsq_s"]:
        fig["same_layers_ratio"] = wall / fig["rsq_s"]
        print(f"  same-layers ratio llm-compressor / rsq --method rsq = {fig['same_layers_ratio']:.2f}x")
    if fig["rsq_gptq_s"]:
        fig["same_layers_ratio_gptq"] = wall / fig["rsq_gptq_s"]
        print(f"  same-layers ratio llm-compressor / rsq --method gptq = {fig['same_layers_ratio_gptq']:.2f}x")
    fig["extrapolated_ratio"] = extrapolated / rsq_full_wall
    print(
        f"  extrapolated to {depth} layers: llm-compressor ~{extrapolated:.0f} s (its {layers}-layer wall x "
        f"{depth}/{layers}) vs rsq's full run {rsq_full_wall:.1f} s = {fig['extrapolated_ratio']:.2f}x"
    )
    return fig


def llmc_child(model_dir: str, out: str, args) -> int:
    """llm-compressor the way its README shows: load, oneshot GPTQ, save compressed."""
    import torch
    from quantize_speed import llmc_gptq  # the same recipe as the in-process bench
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rsq.calib.datasets import load_text, sample_windows, tokenize

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenize(tok, load_text("wikitext2", args.data_dir).calib)
    windows = sample_windows(ids, args.nsamples, args.seqlen, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=args.device)
    llmc_gptq(model, tok, windows)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
