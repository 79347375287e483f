"""Prove that a change to the job layer leaves its outputs bit for bit as they were.

Run the same jobs with two versions of the code (e.g. an untouched export of main and a branch) and
compare the checkpoints tensor by tensor and the results' perplexities and losses:

    git -C REPO archive BASE | tar -x -C /tmp/base-src
    python3 scripts/job_equivalence.py model /tmp/eq/model            # a small random Qwen2 (once)
    PYTHONPATH=/tmp/base-src python3 scripts/job_equivalence.py run /tmp/eq/model /tmp/eq/base
    PYTHONPATH=.             python3 scripts/job_equivalence.py run /tmp/eq/model /tmp/eq/new
    python3 scripts/job_equivalence.py compare /tmp/eq/base /tmp/eq/new   # exit 1 on any difference

``run`` quantizes with rtn, gptq, quarot and rsq, each in memory and streamed from the safetensors
files, and rsq killed after layer 1 and resumed (streamed, and in memory). ``compare`` also takes two
``rsq quantize --out`` directories (``compare A/rtn B/rtn``) or two roots of them.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

METHODS = ("rtn", "gptq", "quarot", "rsq")


def make_model(out: Path) -> None:
    """A 4-layer Qwen2 (hidden 128, 4 heads, 2 KV heads) with random weights and a 512-token BPE
    tokenizer trained on wikitext, saved in shards so that the streamed path reads an index."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    from rsq.calib.datasets import find_wikitext_files

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    for name, p in model.named_parameters():
        if "norm" in name:  # non-trivial norm scales, so that fusing them matters
            p.data = 1 + 0.3 * torch.randn_like(p)
    model.save_pretrained(out, max_shard_size="200KB")
    _, test = find_wikitext_files()  # a data directory's wiki.test.raw, else the packaged .xz copy
    with lzma.open(test, "rt", encoding="utf-8") if test.suffix == ".xz" else test.open(encoding="utf-8") as f:
        text = f.read()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text[:300_000]], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(out)


def _run_quantize():
    try:
        from rsq.job.run import run_quantize
        from rsq.job.store import _Interrupted
    except ImportError:  # the layout before the job layer became a package
        from rsq.run import _Interrupted, run_quantize
    return run_quantize, _Interrupted


def run_jobs(model: Path, out: Path) -> None:
    from rsq.config import RSQConfig

    run_quantize, interrupted = _run_quantize()
    ppl = {"ppl_seqlen": 64, "ppl_max_windows": 6, "ppl_batch_size": 2}
    for method in METHODS:
        cfg = RSQConfig.for_method(method, model=str(model), calib={"nsamples": 8, "seqlen": 64}, batch_size=3)
        run_quantize(cfg, out / f"{method}-memory", stream=False, **ppl)
        run_quantize(cfg, out / f"{method}-streamed", stream=True, **ppl)
    cfg = RSQConfig.for_method("rsq", model=str(model), calib={"nsamples": 8, "seqlen": 64}, batch_size=3)
    for mode, stream in (("streamed", True), ("memory", False)):
        target = out / f"rsq-{mode}-resumed"
        try:
            run_quantize(cfg, target, stream=stream, stop_after_layer=1, **ppl)
        except interrupted:
            pass
        run_quantize(cfg, target, stream=stream, resume=True, **ppl)


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(
            {f"{f.name}:{k}" if f.name == "importance.safetensors" else k: v for k, v in load_file(str(f)).items()}
        )
    return out


def compare_one(a: Path, b: Path) -> list[str]:
    """Differences between two checkpoint directories (empty: bit-identical)."""
    problems = []
    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys():
        problems.append(f"tensor names differ: {sorted(ta.keys() ^ tb.keys())[:5]}")
    for k in sorted(ta.keys() & tb.keys()):
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
            problems.append(f"tensor {k} differs")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for key in ("perplexity", "modules", "config", "rotation", "calibration"):
        if ra.get(key) != rb.get(key):
            problems.append(f"results.json[{key!r}] differs: {ra.get(key)} vs {rb.get(key)}")
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    if ca != cb:
        problems.append("config.json differs")
    return problems


def compare(a: Path, b: Path) -> int:
    pairs = [(a, b)] if (a / "results.json").is_file() else [(d, b / d.name) for d in sorted(a.iterdir()) if d.is_dir()]
    bad = 0
    for x, y in pairs:
        problems = compare_one(x, y)
        n = len(_tensors(x))
        ppl = json.loads((x / "results.json").read_text())["perplexity"]
        status = "bit-identical" if not problems else "DIFFERENT"
        print(f"{x.name:24s} {status}: {n} tensors, perplexity {ppl}")
        for p in problems[:10]:
            print("   ", p)
        bad += bool(problems)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("model").add_argument("out", type=Path)
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "model":
        make_model(args.out)
    elif args.cmd == "run":
        run_jobs(args.model, args.out)
    else:
        return compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
