"""The cost of serveable rotations: gptq / quarot / rsq under each --online-rotations setting, and what exports.

    python3 bench/online_settings.py --out DIR [--model M] [--device cuda] [--jobs 8] [--seeds 0,1,2] [--bits 2,3,4]
        [--rsq-variant "--unrotated-weights weighted"] [--variant-methods rsq,quarot]

Every cell is the command a user runs, `python3 -m rsq quantize MODEL --method M --bits B --seed S
--online-rotations O --out DIR/cells/<name>` (the reference protocol of ../shared/reference-figures.md:
32 calibration windows of 512 tokens, perplexity on 40 x 512 windows of wikitext-2), run as --jobs
parallel subprocesses; a cell whose results.json exists is kept, so a killed bench resumes. gptq has
no rotation, so it runs once per (bits, seed). Then, for seed 0 of every (method, bits, setting), the
exports: `rsq export --format compressed-tensors` and `--format gptq`, each directory's size on disk,
and the compressed-tensors export's perplexity through transformers' own loader (`rsq eval DIR` loads
a non-rsq directory with AutoModelForCausalLM). A refused export records its one-line message.

Every row runs rsq's defaults: under ``none`` that includes ``--unrotated-weights auto`` (uniform down_proj
weights for quarot/rsq at >= 3 bits, weighted at 2 bits; session 13). --rsq-variant FLAGS adds a third method
row, ``rsqv``: rsq with FLAGS appended in every setting (e.g. ``--unrotated-weights weighted``, the default
before session 13, or ``--importance-cap 10``, issue 33), judged like rsq (rsqv < quarot < gptq).
``--variant-methods rsq,quarot`` adds the same FLAGS to quarot too (row ``quarotv``, e.g. for
``--unrotated-outliers keep-float``); rsqv is then judged against quarotv (rsqv < quarotv < gptq).

Writes DIR/online_settings.json and prints a markdown table: mean ± std over seeds per (bits, method,
setting), the cost of `export` / `none` against `exact`, whether rsq < quarot < gptq holds, and the
export matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SETTINGS = ("exact", "export", "none")
PROTOCOL = ["--nsamples", "32", "--seqlen", "512", "--ppl", "wikitext2", "--max-windows", "40"]


def rsq(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "-m", "rsq", *args], capture_output=True, text=True, env=env)


def cells(
    bits: list[int], seeds: list[int], variant: list[str] | None = None, variant_methods: tuple[str, ...] = ("rsq",)
) -> list[tuple[str, list[str]]]:
    out = []
    for b in bits:
        for s in seeds:
            out.append((f"gptq-b{b}-s{s}", ["--method", "gptq", "--bits", str(b), "--seed", str(s)]))
            for m in ("quarot", "rsq"):
                for o in SETTINGS:
                    flags = ["--method", m, "--bits", str(b), "--seed", str(s), "--online-rotations", o]
                    out.append((f"{m}-{o}-b{b}-s{s}", flags))
                    if m in variant_methods and variant:
                        out.append((f"{m}v-{o}-b{b}-s{s}", flags + variant))
    return out


def run_cell(model: list[str], device: str, root: Path, name: str, flags: list[str]) -> dict:
    cell = root / "cells" / name
    if not (cell / "results.json").exists():
        t0 = time.time()
        proc = rsq("quantize", *model, *flags, *PROTOCOL, "--device", device, "--out", str(cell), "--overwrite")
        if proc.returncode != 0:
            return {"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "rc": proc.returncode}
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    res = json.loads((cell / "results.json").read_text())
    return {"name": name, "ppl": res["perplexity"]["wikitext2"], "dir": str(cell)}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def export_cell(cell: dict, device: str, root: Path) -> dict:
    src = Path(cell["dir"])
    row = {"name": cell["name"], "rsq_bytes": weights_bytes(src), "ppl_rsq": cell["ppl"]}
    for fmt in ("compressed-tensors", "gptq"):
        dst = root / "exports" / f"{cell['name']}-{fmt}"
        if not dst.exists():
            proc = rsq("export", str(src), "--format", fmt, "--out", str(dst))
            if proc.returncode != 0:
                row[fmt] = {"refused": (proc.stderr.strip().splitlines() or ["?"])[-1], "rc": proc.returncode}
                continue
        row[fmt] = {"bytes": weights_bytes(dst), "dir_bytes": du(dst)}
        if fmt == "compressed-tensors":
            js = root / "exports" / f"{cell['name']}-{fmt}.ppl.json"
            if not js.exists():
                proc = rsq("eval", str(dst), "--device", device, "--seqlen", "512", "--max-windows", "40",
                           "--json-out", str(js))  # fmt: skip
                if proc.returncode != 0:
                    row[fmt]["eval_error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    continue
            row[fmt]["ppl"] = json.loads(js.read_text())["perplexity"]["wikitext2"]
    return row


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(results: list[dict], exports: list[dict], bits: list[int], variant: str = "") -> str:
    by = {}
    for r in results:
        if "ppl" not in r:
            continue
        key = r["name"].rsplit("-s", 1)[0]
        by.setdefault(key, []).append(r["ppl"])
    lines = ["| bits | method | exact | export | none | cost export / none vs exact |", "|---|---|---|---|---|---|"]
    for b in bits:
        g = by.get(f"gptq-b{b}", [])
        lines.append(f"| {b} | gptq | {mean_std(g)} | (no rotation) | | |")
        for m in ("quarot", "quarotv", "rsq", "rsqv"):
            vals = {o: by.get(f"{m}-{o}-b{b}", []) for o in SETTINGS}
            if not any(vals.values()):
                continue
            cost = []
            for o in ("export", "none"):
                if vals[o] and vals["exact"]:
                    cost.append(f"{statistics.mean(vals[o]) / statistics.mean(vals['exact']) - 1:+.1%}")
            cells_ = " | ".join(mean_std(vals[o]) for o in SETTINGS)
            name = f"{m[:-1]} {variant}" if m.endswith("v") else m
            lines.append(f"| {b} | {name} | {cells_} | {' / '.join(cost)} |")
        for o in SETTINGS:
            for m in ("rsq", "rsqv"):
                against = "quarotv" if m == "rsqv" and by.get(f"quarotv-{o}-b{b}") else "quarot"
                r, q = by.get(f"{m}-{o}-b{b}"), by.get(f"{against}-{o}-b{b}")
                if r and q and g:
                    order = statistics.mean(r) < statistics.mean(q) < statistics.mean(g)
                    per_seed = sum(a < c for a, c in zip(r, q))
                    who = f"rsq {variant}" if m == "rsqv" else "rsq"
                    them = f"quarot {variant}" if against == "quarotv" else "quarot"
                    lines.append(
                        f"|  | {b}-bit `{o}`: {who} < {them} < gptq (means) {'holds' if order else 'FAILS'}; "
                        f"{who} < {them} in {per_seed}/{len(r)} seeds | | | | |"
                    )
    lines += ["", "| cell (seed 0) | rsq ppl | rsq weights | compressed-tensors | gptq |", "|---|---|---|---|---|"]
    for e in exports:

        def fmt(d: dict) -> str:
            if d is None:
                return "–"
            if "refused" in d:
                return "refused: " + d["refused"].removeprefix("rsq: error: ")[:90]
            s = f"{d['bytes'] / 2**20:.1f} MiB"
            return s + (f", ppl {d['ppl']:.2f}" if "ppl" in d else "")

        lines.append(
            f"| {e['name']} | {e['ppl_rsq']:.2f} | {e['rsq_bytes'] / 2**20:.1f} MiB | "
            f"{fmt(e.get('compressed-tensors'))} | {fmt(e.get('gptq'))} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default=None, help="model (default: rsq's embedded SmolLM2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument(
        "--rsq-variant", default="", help='extra rsq flags for a third row, e.g. "--unrotated-weights weighted"'
    )
    ap.add_argument("--variant-methods", default="rsq", help="methods that get --rsq-variant's flags: rsq[,quarot]")
    ap.add_argument("--only", default=None, help="run only the cells whose name matches this regex (e.g. a CPU subset)")
    args = ap.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    model = [args.model] if args.model else []
    t0 = time.time()
    variant = args.rsq_variant.split()
    methods = tuple(args.variant_methods.split(","))
    todo = [c for c in cells(bits, seeds, variant, methods) if not args.only or re.search(args.only, c[0])]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: run_cell(model, args.device, args.out, *c), todo))
    t_cells = time.time() - t0
    firsts = [r for r in results if "ppl" in r and r["name"].endswith(f"-s{seeds[0]}")]
    with ThreadPoolExecutor(args.jobs) as pool:
        exports = list(pool.map(lambda c: export_cell(c, args.device, args.out), firsts))
    report = {
        "protocol": PROTOCOL,
        "rsq_variant": variant,
        "device": args.device,
        "cells": results,
        "exports": exports,
        "wall_s": {"cells": t_cells, "exports": time.time() - t0 - t_cells},
    }
    (args.out / "online_settings.json").write_text(json.dumps(report, indent=2))
    print(summarize(results, exports, bits, args.rsq_variant))
    print(f"\ncells {t_cells:.0f} s, exports {report['wall_s']['exports']:.0f} s ({args.jobs} parallel jobs)")
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"FAILED {r['name']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
