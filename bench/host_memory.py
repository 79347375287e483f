"""Predicted vs measured peak host memory of one `rsq quantize` job on the CPU.

Runs the job in this process, samples the resident set (VmRSS) every 5 ms, tags each sample with
the stage (load, quantize, perplexity, save) and prints, next to rsq.plan.memory.host_memory_plan's
prediction per stage, the measured peak per stage and the process's ru_maxrss.

    python3 bench/host_memory.py                       # the embedded SmolLM2-135M (default options below)
    python3 bench/host_memory.py --tiny-vocab 151936   # a tiny Qwen2 with Qwen2.5's 152k vocabulary
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return 0.0


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stage = "setup"
        self.peaks: dict[str, float] = {}
        self.running = True

    def run(self) -> None:
        while self.running:
            r = rss_gib()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), r)
            time.sleep(0.005)


def tiny_model_dir(vocab: int, root: Path) -> str:
    """A 2-layer Qwen2 (hidden 64) with ``vocab`` tokens and the test suite's tiny wikitext BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from rsq.calib.datasets import find_wikitext_files

    _, test = find_wikitext_files()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [test.read_text(encoding="utf-8")[:300_000]], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>"])
    )
    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    out = root / f"tiny-qwen2-v{vocab}"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny-vocab", type=int, default=None, help="a tiny Qwen2 with this vocabulary instead")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--ppl-batch-size", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument(
        "--logits-budget-mib",
        type=int,
        default=None,
        help="perplexity head chunk size (MiB of logits); a huge value gives the old whole-logits evaluation",
    )
    ap.add_argument("--make-tiny", default=None, help=argparse.SUPPRESS)  # internal: build the tiny model there
    args = ap.parse_args()
    if args.make_tiny:
        print(tiny_model_dir(args.tiny_vocab, Path(args.make_tiny)))
        return

    import torch

    torch.set_num_threads(1)
    import rsq.job.run as run
    from rsq.cli.main import make_parser
    from rsq.cli.options import build_config

    sampler = Sampler()
    sampler.start()
    root = Path(tempfile.mkdtemp(prefix="rsq-mem-"))
    model = None
    if args.tiny_vocab:  # built in a child process, so its memory does not count in this one's peak
        import subprocess

        cmd = [sys.executable, __file__, "--tiny-vocab", str(args.tiny_vocab), "--make-tiny", str(root)]
        model = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    if args.logits_budget_mib:
        import rsq.eval.perplexity

        rsq.eval.perplexity.LOGITS_BUDGET = args.logits_budget_mib * 1024**2

    def staged(name, fn):
        def wrapper(*a, **k):
            previous, sampler.stage = sampler.stage, name
            try:
                return fn(*a, **k)
            finally:
                sampler.stage = previous

        return wrapper

    run.load_model = staged("load", run.load_model)
    run.quantize_layers = staged("quantize", run.quantize_layers)
    run.perplexity = staged("perplexity", run.perplexity)
    run.save_checkpoint = staged("save", run.save_checkpoint)

    argv = ["quantize", *([model] if model else []), "--method", args.method, "--out", str(root / "run")]
    argv += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu"]
    cfg = build_config(make_parser().parse_args(argv))
    res = run.run_quantize(
        cfg,
        root / "run",
        ppl_seqlen=args.ppl_seqlen,
        ppl_max_windows=args.max_windows,
        ppl_batch_size=args.ppl_batch_size,
    )
    sampler.running = False
    sampler.join()
    mem = res["host_memory"]
    report = {
        "model": res["model"],
        "options": {k: v for k, v in vars(args).items() if k != "json_out"},
        "predicted_peak_GiB": mem["predicted_peak_GiB"],
        "measured_peak_GiB (ru_maxrss)": mem["measured_peak_GiB"],
        "error": mem["predicted_peak_GiB"] / mem["measured_peak_GiB"] - 1,
        "predicted_by_stage_GiB": mem["stages_GiB"],
        "sampled_by_stage_GiB": {k: round(v, 3) for k, v in sampler.peaks.items()},
        "ppl_batch_size": mem["ppl_batch_size"],
        "perplexity": res["perplexity"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)


if __name__ == "__main__":
    main()
