"""RSQ speed at real scale: a Llama-3-8B-shaped model with random weights, built on the GPU.

Runs `--method rsq` (rotation + attncon + 3-bit per-channel GPTQ) through rsq's pipeline and prints
per-stage wall time, total, peak GPU and host memory. In the same run it times a plain reference
of the same algorithm (per-sequence fp32 Hessians through full layer forwards, the full attention
probability tensor for importance, one textbook GPTQ per module: per-column torch loop, torch clip
search) on the first --ref-layers layers, checks
that both give the same quantized weights there (tolerance below), and reports the ratio with the
reference's per-layer time extrapolated to all layers.

    python3 bench/quantize_speed.py            # 256 x 4096, 32 layers (the paper's setting)
    python3 bench/quantize_speed.py --quick    # 32 x 2048, 4 layers

Nothing is downloaded: the config is rsq's bundled Llama-3-8B config.json, weights are random.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsq.calib.capture import ActivationStore, capture_layer0_inputs, layer_forward  # noqa: E402
from rsq.config import HESSIAN_MATMULS, RSQConfig  # noqa: E402
from rsq.importance import attention_received_naive, to_weights  # noqa: E402
from rsq.importance.layer import (
    attention_qk,  # noqa: E402
    make_weight_fn,  # noqa: E402
)
from rsq.job.loop import quantize_layers  # noqa: E402
from rsq.models.bundled import load_bundled_config  # noqa: E402
from rsq.models.registry import resolve  # noqa: E402
from rsq.rotation import rotate_model  # noqa: E402
from rsq.solver.gptq import gptq_quantize, layer_error  # noqa: E402


def build_model(layers: int, device: str, tiny: bool = False):
    from transformers import AutoModelForCausalLM

    config = load_bundled_config("llama-3-8b")
    if tiny:
        from rsq.models.bundled import tiny_config

        config = tiny_config(config, layers=layers)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    return model


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _plain_gptq(W, H, cfg: RSQConfig, name: str):
    """Textbook GPTQ: per-column torch loop in 128-column blocks (no CUDA graphs, no fused Triton
    kernels) and the torch loop for the MSE clip search; the same arithmetic as the fast path."""
    return gptq_quantize(W, H, cfg.grid, dataclasses.replace(cfg.solver, cuda_graphs=False), name, kernels="reference")


@torch.no_grad()
def reference_layer(layer, adapter, config, X: torch.Tensor, kwargs: dict, cfg: RSQConfig) -> dict[str, torch.Tensor]:
    """Textbook RSQ for one layer: sequence by sequence, full probabilities, fp32 Hessians, one
    GPTQ per module, sequential groups with full layer forwards. Returns {module: W_hat}."""
    n = X.shape[0]
    weights = []
    for i in range(n):
        q, k = attention_qk(layer, adapter, config, X[i : i + 1], kwargs)
        s = attention_received_naive(q, k)
        weights.append(to_weights(s, cfg.importance, reverse=False))
    out = {}
    for group in adapter.groups:
        modules = {name: layer.get_submodule(name) for name in group}
        H = {name: torch.zeros(m.in_features, m.in_features, device=X.device) for name, m in modules.items()}
        handles = []
        current = {}
        for name, m in modules.items():

            def hook(mod, args, res, name=name):
                x = args[0].float().reshape(-1, mod.in_features) * current["w"].reshape(-1, 1).sqrt()
                H[name] += x.T @ x

            handles.append(m.register_forward_hook(hook))
        for i in range(n):
            current["w"] = weights[i]
            layer_forward(layer, X[i : i + 1], kwargs)
        for h in handles:
            h.remove()
        for name, m in modules.items():
            W = m.weight.data.float().clone()
            Hn = H[name] * 2 / n
            res = _plain_gptq(W, Hn, cfg, name)
            m.weight.data = res.weight.to(m.weight.dtype)
            out[name] = (W.cpu(), res.weight.cpu(), Hn.cpu())  # compared after the timed run
    return out


def llmc_gptq(model, tokenizer, windows: torch.Tensor) -> None:
    """llm-compressor's oneshot GPTQ on ``model`` in place: 3-bit symmetric per-channel integer
    weights on every decoder linear (lm_head kept), act-order off, block 128, damping 0.01, its
    sequential pipeline, calibration ``windows`` (N, T) of token ids."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "channel"}
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        actorder=None,
        block_size=128,
        dampening_frac=0.01,
    )
    data = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=loader,
        recipe=recipe,
        num_calibration_samples=len(windows),
        max_seq_length=windows.shape[1],
        pipeline="sequential",
    )


def run_llmcompressor(layers: int, windows: torch.Tensor, device: str, tiny: bool) -> dict:
    """llm-compressor's GPTQ (oneshot + GPTQModifier, its sequential pipeline) on a fresh random model
    of ``layers`` layers with the same calibration windows: 3-bit symmetric per-channel integer
    weights on every decoder linear, act-order off, block 128, damping 0.01 (its defaults otherwise).
    No rotation and no importance: plain GPTQ, less work than RSQ. Returns wall time and memory."""
    import tempfile

    model = build_model(layers, device, tiny)
    # oneshot re-reads the config from model.config.name_or_path: give it a local copy
    cfg_dir = tempfile.mkdtemp(prefix="llmc-config-")
    model.config.save_pretrained(cfg_dir)
    model.config.name_or_path = cfg_dir
    # oneshot insists on a processor when given data; the windows are already token ids
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    llmc_gptq(model, tok, windows)
    if cuda:
        torch.cuda.synchronize()
    return {
        "llmc_layers": layers,
        "llmc_s": time.perf_counter() - t0,
        "llmc_peak_gpu_GiB": torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 x 2048 tokens, 4 layers")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--ref-layers", type=int, default=1, help="layers timed with the plain reference (0 = none)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="structure-preserving tiny config (CPU smoke test)")
    ap.add_argument(
        "--gptq-inner",
        type=int,
        default=None,
        help="columns per inner sub-block of the GPTQ block (SolverConfig.inner_block; a huge value "
        "gives the one-level block of the earlier version, for comparison)",
    )
    ap.add_argument(
        "--hessian-matmul",
        default="auto",
        choices=list(HESSIAN_MATMULS),
        help="SolverConfig.hessian_matmul (split: two products per weighted Hessian; single, fp16: one; "
        "auto: fp16 on CUDA)",
    )
    ap.add_argument(
        "--llmc-layers",
        type=int,
        default=None,
        help="layers of the model llm-compressor's GPTQ is timed on (default 4, or 2 with --quick; 0 = "
        "skip); its per-layer time is extrapolated to --layers",
    )
    ap.add_argument(
        "--model-home",
        default="cpu",
        choices=("cpu", "device"),
        help="where the model waits between its layers' turns (built and rotated on the device "
        "either way; cpu is what `rsq quantize` does with a model loaded from disk)",
    )
    ap.add_argument(
        "--expand", type=int, default=1, help="dataset expansion factor (spec §5): nsamples x expand rolled windows"
    )
    ap.add_argument(
        "--offload",
        default="device",
        choices=("device", "cpu", "disk", "auto"),
        help="where the calibration activations live (cpu: pinned host memory; x8 expansion at 8B "
        "needs 68.7 GB: cpu on a 128 GiB host)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        help="run the quantization under torch.profiler and write its kernel table (top 60 by "
        "self device time) to this file",
    )
    ap.add_argument(
        "--kernels",
        default="auto",
        choices=("auto", "reference"),
        help="RSQConfig.kernels of the rsq run: auto = the Triton kernels on CUDA (clip search, GPTQ "
        "sub-blocks, Hessian split, attention sums); reference = the torch code everywhere",
    )
    args = ap.parse_args()
    layers = args.layers or (4 if args.quick else 32)
    nsamples = args.nsamples or (32 if args.quick else 256)
    seqlen = args.seqlen or (2048 if args.quick else 4096)
    device = args.device
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'}  torch {torch.__version__}  "
        f"layers {layers}  calib {nsamples}x{seqlen}",
        flush=True,
    )

    t0 = time.perf_counter()
    model = build_model(layers, device, args.tiny)
    sync()
    t_build = time.perf_counter() - t0
    adapter = resolve(model)
    cfg = RSQConfig.for_method(
        "rsq",
        grid={"bits": 3},
        solver={"hessian_matmul": args.hessian_matmul, **({"inner_block": args.gptq_inner} if args.gptq_inner else {})},
        importance={"expand": args.expand},
        calib={"nsamples": nsamples, "seqlen": seqlen},
        dtype="bfloat16",
        device=device,
        batch_size=args.batch_size,
        offload=args.offload,
        kernels=args.kernels,
    )
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=g)

    sync()
    t0 = time.perf_counter()
    rotate_model(model, adapter, cfg.rotation)
    sync()
    t_rotate = time.perf_counter() - t0

    ref = None
    if args.ref_layers:
        ref_layers = [copy.deepcopy(adapter.get_layers(model)[i]) for i in range(args.ref_layers)]
        store = ActivationStore(
            nsamples, seqlen, model.config.hidden_size, torch.bfloat16, torch.device(device), "device"
        )
        kwargs = capture_layer0_inputs(
            model, adapter.get_layers(model), windows, store, args.batch_size, torch.device(device)
        )
        print(
            "layer kwargs:", {k: (type(v).__name__, getattr(v, "shape", None)) for k, v in kwargs.items()}, flush=True
        )
        X = store.data
        sync()
        t0 = time.perf_counter()
        ref_w = []
        for layer in ref_layers:
            ref_w.append(reference_layer(layer, adapter, model.config, X, kwargs, cfg))
            print(f"  reference layer done at {time.perf_counter() - t0:.1f} s", flush=True)
            X = torch.cat(
                [layer_forward(layer, X[i : i + args.batch_size], kwargs) for i in range(0, nsamples, args.batch_size)]
            )
        sync()
        t_ref = (time.perf_counter() - t0) / args.ref_layers
        store.close()
        del X, ref_layers, store  # nothing of the reference may stay on the GPU: the run's peak is measured next
        if cuda:
            torch.cuda.empty_cache()
        ref = (ref_w, t_ref)

    if args.model_home == "cpu":
        model.to("cpu")  # as a real run holds it: each layer visits the GPU for its turn
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    weight_fn = make_weight_fn(cfg, adapter, model.config, windows)
    sync()
    t0 = time.perf_counter()
    at_layer = {}

    def progress(i, n, msg):
        at_layer[i] = time.perf_counter() - t0
        print(f"  layer {i}/{n} at {at_layer[i]:.1f} s", flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            state = quantize_layers(model, cfg, windows, adapter=adapter, weight_fn=weight_fn, progress=progress)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        averages = prof.key_averages()
        table = averages.table(sort_by=key, row_limit=60, max_name_column_width=90)
        # the stages' named ranges (rsq.job.state.timed): host wall inside each against the device
        # time of the kernels it launched; a stage whose device time is far below its wall waits
        # on the host (launches, copies, synchronizations)
        lines = ["stage ranges: calls, host total (s), device total (s)"]
        for ev in averages:
            if ev.key.startswith("rsq:"):
                dev = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0))
                lines.append(f"  {ev.key:24s} {ev.count:6d} {ev.cpu_time_total / 1e6:10.2f} {dev / 1e6:10.2f}")
        Path(args.profile).write_text("\n".join(lines) + "\n\n" + table)
        print("\n".join(lines), flush=True)
    else:
        state = quantize_layers(model, cfg, windows, adapter=adapter, weight_fn=weight_fn, progress=progress)
    sync()
    t_quant = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0

    figures = {
        "layers": layers,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "expand": args.expand,
        "offload": args.offload,
        "build_s": t_build,
        "rotate_s": t_rotate,
        "quantize_s": t_quant,
        "total_s": t_rotate + t_quant,
        "stages_s": state.timings,
        "peak_gpu_GiB": peak_gpu,
        "peak_host_GiB": host_peak_gib(),
        "gpu_peak_by_stage_GiB": state.gpu_peaks,
        "hessian_matmul": args.hessian_matmul,
        "losses": {str(r.index): r.losses for r in state.layers},
    }
    if ref is not None:
        ref_w, t_ref = ref
        # GPTQ is chaotic (one rounding flip changes every later column of a row), so the two
        # paths are compared by quality: each one's layer error tr(ΔW H ΔWᵀ) under the
        # reference's fp32 Hessian; they must agree within 5%.
        ratios = {}
        for i, mods in enumerate(ref_w):
            for name, (W, w_ref, Hn) in mods.items():
                W, w_ref, Hn = W.to(device), w_ref.to(device), Hn.to(device)
                w = adapter.get_layers(model)[i].get_submodule(name).weight.float().to(device)
                ratios[f"{i}.{name}"] = layer_error(W, w, Hn) / layer_error(W, w_ref, Hn)
        figures.update(
            ref_s_per_layer=t_ref,
            ref_s_extrapolated=t_ref * layers,
            speedup_vs_ref=t_ref * layers / t_quant,
            error_ratio_fast_over_ref=ratios,
            error_ratio_max=max(ratios.values()),
            error_ratio_min=min(ratios.values()),
        )
    llmc_layers = min(layers, args.llmc_layers if args.llmc_layers is not None else (2 if args.quick else 4))
    if llmc_layers:
        try:
            import llmcompressor  # noqa: F401
        except ImportError as e:
            print(f"llm-compressor not importable ({e}): install the bench extra to compare", flush=True)
            llmc_layers = 0
    if llmc_layers:
        del model
        if cuda:
            torch.cuda.empty_cache()
        llmc = run_llmcompressor(llmc_layers, windows, device, args.tiny)
        per_layer = llmc["llmc_s"] / llmc_layers
        # two ratios: all layers (llm-compressor's time per layer, its fixed costs included, times
        # the layer count) and like for like (rsq's own time to its llmc_layers-th layer; rsq's
        # rotation and first-layer setup then weigh more)
        figures.update(
            llmc,
            llmc_s_per_layer=per_layer,
            llmc_s_extrapolated=per_layer * layers,
            speedup_vs_llmc=per_layer * layers / (t_rotate + t_quant),
            rsq_s_first_llmc_layers=t_rotate + at_layer[llmc_layers],
            speedup_vs_llmc_same_layers=llmc["llmc_s"] / (t_rotate + at_layer[llmc_layers]),
        )
    print(json.dumps(figures, indent=2))
    print()
    print(f"{'stage':<12} {'seconds':>9}")
    for k, v in figures["stages_s"].items():
        print(f"{k:<12} {v:9.1f}")
    print(f"{'rotate':<12} {t_rotate:9.1f}")
    print(f"{'TOTAL':<12} {t_rotate + t_quant:9.1f}   (target < 180 s at 256x4096, 32 layers)")
    print(
        f"peak GPU {peak_gpu:.1f} GiB (run's peak at the end of each stage: "
        + ", ".join(f"{k} {v:.1f}" for k, v in figures["gpu_peak_by_stage_GiB"].items())
        + f"), peak host {figures['peak_host_GiB']:.1f} GiB"
    )
    if ref is not None:
        print(
            f"plain reference: {ref[1]:.1f} s/layer -> {ref[1] * layers:.0f} s for {layers} layers "
            f"(extrapolated); speed-up {figures['speedup_vs_ref']:.1f}x; layer error fast/ref "
            f"{figures['error_ratio_min']:.3f}..{figures['error_ratio_max']:.3f} (must be within 0.95..1.05)"
        )
    if llmc_layers:
        print(
            f"llm-compressor GPTQ (3-bit per channel, no rotation/importance): {figures['llmc_s']:.1f} s for "
            f"{llmc_layers} layers -> {figures['llmc_s_extrapolated']:.0f} s for {layers} (extrapolated); "
            f"speed-up {figures['speedup_vs_llmc']:.1f}x (same {llmc_layers} layers: "
            f"{figures['speedup_vs_llmc_same_layers']:.1f}x); its peak GPU {figures['llmc_peak_gpu_GiB']:.1f} GiB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
