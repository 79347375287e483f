"""A model card (the hub's README.md form: YAML header, then prose) for an exported checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

SERVE = {
    "compressed-tensors": (
        "vLLM applies the online Hadamard transform (if any) itself. Plain transformers loads the weights but "
        "ignores transform_config, so a checkpoint with a transform gives wrong logits there: quantize with "
        "`--online-rotations none` for runtimes without transforms."
    ),
    "gptq": "vLLM (gptq / gptq_marlin), SGLang and transformers (with gptqmodel) load it as any GPTQ checkpoint.",
}


def write_model_card(src: Path, out: Path, qc: dict, fmt: str, transforms: list[str] | None = None) -> None:
    """Write ``out/README.md`` describing the export of rsq checkpoint ``src`` (quantization_config ``qc``)."""
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
        + (f" (exported as transforms on {', '.join(transforms)})" if transforms else ""),
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
        f"vllm serve {out.name}",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{out.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{out.name}")',
        "```",
        "",
        SERVE.get(fmt, ""),
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
