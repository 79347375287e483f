"""Time the command a user runs: `rsq quantize` on a checkpoint saved on disk, launch to finished output.

    python3 bench/cli_speed.py --shape llama-3-8b --work /tmp/cli-bench [--layers N] [--keep]

1. builds random weights of a bundled shape (rsq/models/configs, e.g. llama-3-8b, qwen2.5-7b,
   qwen2.5-14b) in bf16 on the GPU, `save_pretrained`s them with a tokenizer into WORK/model (skipped
   when it is already there), and frees the GPU;
2. runs `python3 -m rsq quantize WORK/model --method rsq --bits 3 --nsamples 256 --seqlen 4096
   --device cuda --dtype bfloat16 --ppl wikitext2 --max-windows 8 --out WORK/q` as a subprocess,
   exactly as a user would, and measures its wall time from launch to the finished directory and
   its peak resident host memory (the child's ru_maxrss);
3. prints the stage split and the GPU peaks that the run's results.json records.

The tokenizer and the calibration text: --tokenizer DIR (any saved Hugging Face tokenizer; its
ids must be below the shape's vocabulary) and --data-dir (wiki.test.raw). llm-compressor is not
timed here (quantize_speed.py does, in process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    args = ap.parse_args()

    work = Path(args.work)
    model_dir, out = work / "model", work / "q"
    if not (model_dir / "config.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        build(args.shape, args.layers, args.tokenizer, model_dir, args.device)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(str(out) + ".partial", ignore_errors=True)
    cmd = [sys.executable, "-m", "rsq", "quantize", str(model_dir), "--method", "rsq", "--bits", "3"]
    cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
    cmd += ["--dtype", "bfloat16", "--ppl", "wikitext2", "--max-windows", "8", "--data-dir", args.data_dir]
    cmd += ["--out", str(out), *args.extra.split()]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    peak_host = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB -> GiB
    if proc.returncode:
        print(f"rsq quantize failed with exit code {proc.returncode}")
        return proc.returncode
    res = json.loads((out / "results.json").read_text())
    t = res["timings"]
    print(f"\nwall {wall:.1f} s launch to finished {out}; peak host RSS {peak_host:.1f} GiB")
    for k in ("load", "rotate", "quantize", "perplexity", "save", "total"):
        print(f"  {k:<11} {t.get(k, 0.0):7.1f} s")
    for k, v in (t.get("stages") or {}).items():
        print(f"    stage {k:<11} {v:7.1f} s")
    print(f"  GPU peaks (GiB): {res.get('gpu_peak_GiB')}")
    print(f"  perplexity: {res.get('perplexity')}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"wall_s": wall, "peak_host_GiB": peak_host, "timings": t, "gpu": res.get("gpu_peak_GiB")})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
