"""Perplexity of `rsq export --format gptq` directories read without rsq's loader or packer.

    python3 bench/gptq_export_ppl.py GPTQ_DIR [GPTQ_DIR ...] [--seqlen 512] [--max-windows 40]

Each directory is unpacked by the test suite's independent GPTQ unpacker
(tests/integration/test_export_gptq.py: written from the layout's description, shares no code with
rsq/quant/pack.py) into a plain float32 transformers model, and evaluated on the wikitext-2
evaluation windows rsq uses (rsq's window split and perplexity function; only the model is foreign).
transformers' own GPTQ loader needs gptqmodel, which does not install on these CPU machines.
Prints one JSON line per directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsq.calib.datasets import eval_windows, load_text, tokenize  # noqa: E402
from rsq.eval.perplexity import perplexity  # noqa: E402
from tests.integration.test_export_gptq import _float_model_from_export  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    text = load_text("wikitext2", args.data_dir).eval
    for d in args.dirs:
        model, _, qc = _float_model_from_export(d)
        wins = eval_windows(tokenize(AutoTokenizer.from_pretrained(d), text), args.seqlen, args.max_windows)
        with torch.no_grad():
            ppl = perplexity(model, wins, torch.device("cpu"))
        print(json.dumps({"dir": str(d), "bits": qc["bits"], "group_size": qc["group_size"], "ppl": ppl}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
