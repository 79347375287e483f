"""Peak host memory of dataset expansion (spec §5): expand=F must not hold F copies in RAM.

Runs the rsq pipeline (attncon) on a Llama-shaped model with random weights for F = 1 and F = 8,
each in a fresh process, and prints peak RSS. With F > 1 the calibration activations stream
through a disk-backed store, rolled windows are made on the fly, and Hessians accumulate per batch,
so RAM stays near the F = 1 figure while the activation bytes grow F-fold (printed for scale).

    python3 bench/expand_memory.py [--hidden 512 --layers 2 --nsamples 32 --seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from rsq.config import RSQConfig
    from rsq.importance.layer import make_weight_fn
    from rsq.job.loop import quantize_layers
    from rsq.models.registry import resolve

    torch.manual_seed(0)
    cfg_m = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(cfg_m).eval().requires_grad_(False)
    windows = torch.randint(0, 1024, (args.nsamples, args.seqlen))
    cfg = RSQConfig.for_method(
        "rsq",
        rotation={"enabled": False},  # the model is not rotated here: memory only
        importance={"expand": args.expand},
        calib={"nsamples": args.nsamples, "seqlen": args.seqlen},
        device="cpu",
        batch_size=4,
    )
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    quantize_layers(
        model,
        cfg,
        windows,
        adapter=resolve(model),
        weight_fn=make_weight_fn(cfg, resolve(model), model.config, windows),
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    acts = args.nsamples * args.expand * args.seqlen * args.hidden * 4
    print(
        json.dumps(
            {
                "expand": args.expand,
                "peak_rss_MiB": peak / 1024,
                "before_MiB": base / 1024,
                "activation_bytes_MiB": acts / 2**20,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--factors", default="1,8")
    ap.add_argument("--expand", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.expand is not None:
        child(args)
        return
    rows = []
    for f in [int(x) for x in args.factors.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--expand",
            str(f),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = rows[0]
    print(f"{'F':>3} {'activations MiB':>16} {'peak RSS MiB':>13} {'RSS growth vs F=1':>18}")
    for r in rows:
        print(
            f"{r['expand']:>3} {r['activation_bytes_MiB']:>16.0f} {r['peak_rss_MiB']:>13.0f} "
            f"{r['peak_rss_MiB'] / base['peak_rss_MiB']:>17.2f}x"
        )


if __name__ == "__main__":
    main()
