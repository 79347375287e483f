"""Prove that a change to the dequantize-once paths leaves a loaded checkpoint's outputs bit for bit
as they were: the logits of rsq checkpoints in the three ways a loaded model computes, with two
versions of the code (e.g. an untouched export of main and a branch):

    git -C REPO archive BASE | tar -x -C /tmp/base-src
    PYTHONPATH=/tmp/base-src python3 scripts/dense_equivalence.py logits /tmp/eq/base.pt CKPT...
    PYTHONPATH=.             python3 scripts/dense_equivalence.py logits /tmp/eq/new.pt CKPT...
    python3 scripts/dense_equivalence.py compare /tmp/eq/base.pt /tmp/eq/new.pt   # exit 1 on any difference

For each checkpoint (``scripts/job_equivalence.py run`` writes some), in float32 and cast to
bfloat16: ``cache`` (rsq.load: W_hat dequantized once, float32), ``packed`` (rsq.load(packed=True):
the reference kernel on every call) and ``dense`` (``--dense``: nn.Linear in the model's dtype),
each called twice (the second call runs on the cached W_hat). ``compare`` also prints, for the
second file, whether cache and dense agree exactly (they must in float32, where both compute in
the same dtype).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.bfloat16)
MODES = ("cache", "packed", "dense")


def _dense(model) -> None:
    try:
        from rsq.checkpoint.dense import dequantize_once
    except ImportError:  # the code before dequantize_once: the --dense helper had its own name
        from rsq.checkpoint.dense import dense_linears

        dense_linears(model)
        return
    dequantize_once(model, keep_packed=False)


def logits(out: Path, checkpoints: list[Path]) -> None:
    import rsq

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 24))
    found = {}
    for ckpt in checkpoints:
        for dtype in DTYPES:
            for mode in MODES:
                model, _ = rsq.load(ckpt, packed=mode == "packed")
                model.to(dtype)
                if mode == "dense":
                    _dense(model)
                for call in (1, 2):
                    with torch.no_grad():
                        found[f"{ckpt.name} {str(dtype)[6:]} {mode} call{call}"] = model(input_ids=ids).logits
    torch.save(found, out)
    print(f"{len(found)} logit tensors -> {out}")


def compare(a: Path, b: Path) -> int:
    ta, tb = torch.load(a), torch.load(b)
    if ta.keys() != tb.keys():
        print(f"different keys: {sorted(ta.keys() ^ tb.keys())[:5]}")
        return 1
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    print(f"{len(ta) - len(bad)} of {len(ta)} logit tensors bit-identical")
    for k in bad:
        print("   DIFFERENT:", k)
    for k in sorted(tb):
        if " cache call1" in k:
            same = torch.equal(tb[k], tb[k.replace(" cache ", " dense ")])
            print(f"   {k.replace(' cache call1', ''):28s} cache == dense: {same}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("logits")
    r.add_argument("out", type=Path)
    r.add_argument("checkpoints", type=Path, nargs="+")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "logits":
        logits(args.out, args.checkpoints)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
