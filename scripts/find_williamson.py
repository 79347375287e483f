#!/usr/bin/env python3
"""Search four ±1 sequences of odd length n whose periodic autocorrelations sum to zero off peak.

Such a quadruple (a, b, c, d) gives four circulant matrices A, B, C, D with
A·Aᵀ + B·Bᵀ + C·Cᵀ + D·Dᵀ = 4n·I, and the Goethals–Seidel array turns them into a Hadamard
matrix of order 4n (rsq.rotation.hadamard does that). With ``--symmetric`` the sequences are
symmetric (a_i = a_{n-i}), i.e. Williamson matrices; without it they are general (Goethals–Seidel
type), which has many more solutions and is what rsq ships.

Method: simulated annealing, vectorized over many independent chains with numpy. The state of a
chain is the four sequences and the vector P(s) = Σ_k PAF_k(s) for s = 1..(n-1)/2 (PAF is
symmetric, PAF(s) = PAF(n-s)); the energy is E = Σ_s P(s)². A move flips one entry a_j of one
sequence, which changes P by ΔP(s) = -2·a_j·(a_{j+s} + a_{j-s}) ∈ {-4, 0, 4}: O(n) per move.
Metropolis acceptance at a per-chain temperature (a geometric ladder); a chain that has not
improved its best energy for ``--patience`` steps restarts from random signs. E = 0 is a solution.

Every solution is re-verified from scratch (exact integer PAFs) before it is printed or saved.

Usage:
    python scripts/find_williamson.py 23 29 39 43 --out rsq/data/gs_sequences.json
    python scripts/find_williamson.py 23 --symmetric --seconds 60
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def paf(seq: np.ndarray) -> np.ndarray:
    """Periodic autocorrelation of integer sequences along the last axis, lags 0..n-1."""
    return np.stack([(seq * np.roll(seq, -s, axis=-1)).sum(-1) for s in range(seq.shape[-1])], -1)


def is_solution(seqs: np.ndarray) -> bool:
    """Exact check: Σ_k PAF_k(s) == 0 for every lag s = 1..n-1."""
    total = paf(seqs.astype(np.int64)).sum(0)
    return bool(np.all(total[1:] == 0))


def _initial(rng: np.random.Generator, chains: int, n: int, symmetric: bool) -> np.ndarray:
    seqs = rng.choice(np.array([-1, 1], dtype=np.int8), size=(chains, 4, n))
    if symmetric:
        seqs[..., n - np.arange(1, n // 2 + 1)] = seqs[..., 1 : n // 2 + 1]
    return seqs


def _energy_terms(seqs: np.ndarray, h: int) -> np.ndarray:
    """P(s) for s = 1..h, shape (chains, h), from scratch."""
    s32 = seqs.astype(np.int32)
    return np.stack([(s32 * np.roll(s32, -s, axis=-1)).sum((-1, -2)) for s in range(1, h + 1)], -1)


def _delta_single(rows: np.ndarray, j: np.ndarray, shifts: np.ndarray, n: int) -> np.ndarray:
    """ΔP(s), s = 1..h, for flipping rows[c, j[c]] (rows: (chains, n) int32)."""
    c = np.arange(rows.shape[0])[:, None]
    aj = rows[c[:, 0], j][:, None]
    plus = rows[c, (j[:, None] + shifts) % n]
    minus = rows[c, (j[:, None] - shifts) % n]
    return -2 * aj * (plus + minus)


@dataclass(frozen=True)
class Search:
    """The annealer's settings (the command's options): Williamson-symmetric sequences or not, the
    number of chains, a time limit, the rng seed, steps without improvement before a chain restarts,
    the temperature ladder's ends (in energy quanta of 16), seconds between progress lines."""

    symmetric: bool = False
    chains: int = 1024
    seconds: float = 1800.0
    seed: int = 0
    patience: int = 50000
    t_lo: float = 0.5
    t_hi: float = 2.0
    log_every: float = 10.0


def anneal(n: int, search: Search) -> np.ndarray | None:
    """Run the annealer for at most ``search.seconds``; return one solution (4, n) int8 or None."""
    symmetric, chains, seconds, patience = search.symmetric, search.chains, search.seconds, search.patience
    seed, t_lo, t_hi, log_every = search.seed, search.t_lo, search.t_hi, search.log_every
    if n % 2 == 0 or n < 3:
        raise ValueError("n must be odd and >= 3")
    rng = np.random.default_rng(seed)
    h = (n - 1) // 2
    shifts = np.arange(1, h + 1)
    seqs = _initial(rng, chains, n, symmetric)
    P = _energy_terms(seqs, h)
    E = (P.astype(np.int64) ** 2).sum(-1)
    best = E.copy()
    since = np.zeros(chains, dtype=np.int64)
    # temperatures in units of the energy quantum 16 (P moves in steps of 4)
    temps = 16.0 * np.geomspace(t_lo, t_hi, chains)
    cidx = np.arange(chains)
    start = last_log = time.time()
    steps = 0
    while time.time() - start < seconds:
        for _ in range(200):
            k = rng.integers(0, 4, chains)
            rows = seqs[cidx, k].astype(np.int32)  # (chains, n)
            if symmetric:
                j = rng.integers(0, h + 1, chains)
                d = _delta_single(rows, j, shifts, n)
                pair = j > 0
                rows2 = rows.copy()
                rows2[cidx, j] *= -1
                jj = np.where(pair, n - j, 0)
                d2 = _delta_single(rows2, jj, shifts, n)
                d = d + np.where(pair[:, None], d2, 0)
            else:
                j = rng.integers(0, n, chains)
                d = _delta_single(rows, j, shifts, n)
            Pn = P + d
            En = (Pn.astype(np.int64) ** 2).sum(-1)
            dE = En - E
            accept = (dE <= 0) | (rng.random(chains) < np.exp(-np.maximum(dE, 0) / temps))
            a = np.nonzero(accept)[0]
            seqs[a, k[a], j[a]] *= -1
            if symmetric:
                ap = a[j[a] > 0]
                seqs[ap, k[ap], n - j[ap]] *= -1
            P[a] = Pn[a]
            E[a] = En[a]
            improved = E < best
            best = np.minimum(best, E)
            since = np.where(improved, 0, since + 1)
            steps += 1
            hit = np.nonzero(E == 0)[0]
            if hit.size:
                sol = seqs[hit[0]].copy()
                if is_solution(sol):
                    return sol
                raise AssertionError("incremental energy drifted from the exact PAF")
            stale = np.nonzero(since > patience)[0]
            if stale.size:
                seqs[stale] = _initial(rng, stale.size, n, symmetric)
                P[stale] = _energy_terms(seqs[stale], h)
                E[stale] = (P[stale].astype(np.int64) ** 2).sum(-1)
                best[stale] = E[stale]
                since[stale] = 0
        now = time.time()
        if now - last_log > log_every:
            last_log = now
            print(
                f"n={n} t={now - start:.0f}s steps={steps} moves={steps * chains:.2e} "
                f"min E now={E.min()} (in quanta {E.min() // 16})",
                file=sys.stderr,
                flush=True,
            )
    return None


def to_string(seq: np.ndarray) -> str:
    return "".join("+" if v > 0 else "-" for v in seq)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, nargs="+", help="odd sequence lengths (Hadamard order 4n)")
    ap.add_argument("--symmetric", action="store_true", help="Williamson (symmetric) sequences only")
    ap.add_argument("--chains", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=1800.0, help="time limit per n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patience", type=int, default=50000, help="steps without improvement before a chain restarts")
    ap.add_argument("--t-lo", type=float, default=0.5, help="lowest chain temperature, in energy quanta (16)")
    ap.add_argument("--t-hi", type=float, default=2.0, help="highest chain temperature, in energy quanta (16)")
    ap.add_argument("--out", type=Path, help="JSON file to add the solutions to (created if absent)")
    args = ap.parse_args()

    data = {"format": "rsq-gs-sequences-1", "sequences": {}}
    if args.out is not None and args.out.exists():
        data = json.loads(args.out.read_text())
    failed = []
    for n in args.n:
        t0 = time.time()
        search = Search(args.symmetric, args.chains, args.seconds, args.seed + n, args.patience, args.t_lo, args.t_hi)
        sol = anneal(n, search)
        if sol is None:
            print(f"n={n}: no solution in {args.seconds:.0f}s", file=sys.stderr)
            failed.append(n)
            continue
        strings = [to_string(s) for s in sol]
        sums = [int(s.sum()) for s in sol]
        print(f"n={n}: found in {time.time() - t0:.1f}s, row sums {sums}")
        for s in strings:
            print("  " + s)
        data["sequences"][str(n)] = {
            "symmetric": bool(args.symmetric),
            "rows": strings,
            "found_by": (
                f"scripts/find_williamson.py{' --symmetric' if args.symmetric else ''} "
                f"--seed {args.seed} (rng seed {args.seed + n}) --chains {args.chains} "
                f"--patience {args.patience} --t-lo {args.t_lo} --t-hi {args.t_hi}"
            ),
        }
    if args.out is not None:
        data["sequences"] = dict(sorted(data["sequences"].items(), key=lambda kv: int(kv[0])))
        text = json.dumps(data, indent=1) + "\n"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}  sha256={hashlib.sha256(text.encode()).hexdigest()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
