"""Hadamard matrices, random rotations built from them, and a fast Hadamard transform.

A Hadamard matrix of order n is an n×n matrix H with entries ±1 and H·Hᵀ = n·I, so H/√n is
orthogonal. One can exist only for n = 1, 2 or a multiple of 4. rsq builds every order as

    H_n = H_K ⊗ H_M,    n = K·M,  M = 2^m,  K the smallest "core" order that works,

where H_M is Sylvester's matrix and H_K (K = 1 or K not a power of two) is one of

* ``paley1(q)``: order q+1 for a prime power q ≡ 3 (mod 4) (Paley's first construction);
* ``paley2(q)``: order 2(q+1) for a prime power q ≡ 1 (mod 4) (Paley's second construction);
* ``goethals-seidel(m)``: order 4m from four circulant ±1 sequences of length m whose periodic
  autocorrelations sum to zero off the peak, put into the Goethals–Seidel array. The sequences are
  data (``rsq/data/gs_sequences.json``, sha256-checked), found by ``scripts/find_williamson.py``;
* a Kronecker product of two such cores.

The structure H_K ⊗ H_M is what :func:`hadamard_transform` exploits: with x viewed as a (K, M)
matrix X (row-major), (H_K ⊗ H_M)·vec(X) = vec(H_K·X·H_Mᵀ), i.e. an O(n log M) butterfly pass
over the last axis and one small K×K matmul.

Finite fields GF(p^k) for Paley's constructions are implemented here (integer codes whose base-p
digits are polynomial coefficients, reduced by an irreducible polynomial found by search).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from rsq.errors import NoHadamardError, RSQError

log = logging.getLogger(__name__)

GS_DATA_FILE = "gs_sequences.json"
# sha256 of rsq/data/gs_sequences.json; a mismatch means the installed data file was altered
GS_DATA_SHA256 = "b6ddc94cfc204ea8f6c214b7d8feb5706ab2d7323897a9e72e8bfbee4698998e"

__all__ = [
    "HadamardSpec",
    "hadamard_spec",
    "hadamard_kind",
    "has_hadamard",
    "hadamard_matrix",
    "random_hadamard",
    "random_orthogonal",
    "hadamard_transform",
    "sylvester_block",
    "block_hadamard_transform",
    "paley_matrix",
    "goethals_seidel_matrix",
    "GaloisField",
]


# --------------------------------------------------------------------------- number theory


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k ≥ 1; None if q is not a prime power."""
    if q < 2:
        return None
    p = next((f for f in range(2, math.isqrt(q) + 1) if q % f == 0), q)  # smallest prime factor
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


class GaloisField:
    """GF(q), q = p^k. Element codes 0..q-1; code c has base-p digits (c_0, …, c_{k-1}) = the
    coefficients of c_0 + c_1·x + … + c_{k-1}·x^{k-1}, reduced modulo a monic irreducible
    polynomial of degree k (the lexicographically first one). Code 0 is the zero, code 1 the one.
    """

    def __init__(self, q: int):
        pk = _prime_power(q)
        if pk is None:
            raise ValueError(f"GF({q}) does not exist: {q} is not a prime power")
        self.q, (self.p, self.k) = q, pk
        self.modulus = self._find_irreducible()  # low-first coefficients, length k+1, monic

    # polynomials: tuples of coefficients mod p, lowest degree first
    def _polymod(self, a: list[int], m: tuple[int, ...]) -> list[int]:
        a = list(a)
        dm = len(m) - 1
        inv_lead = pow(m[-1], -1, self.p)
        for i in range(len(a) - 1, dm - 1, -1):
            c = a[i] * inv_lead % self.p
            if c:
                for t in range(dm + 1):
                    a[i - dm + t] = (a[i - dm + t] - c * m[t]) % self.p
        return a[:dm] + [0] * max(0, dm - len(a))

    def _monic(self, degree: int):
        for code in range(self.p**degree):
            yield tuple(self._digits(code, degree)) + (1,)

    def _find_irreducible(self) -> tuple[int, ...]:
        if self.k == 1:
            return (0, 1)
        for f in self._monic(self.k):
            # irreducible iff no monic factor of degree 1..k//2
            factors = (g for d in range(1, self.k // 2 + 1) for g in self._monic(d))
            if all(any(self._polymod(list(f), g)) for g in factors):
                return f
        raise AssertionError(f"no irreducible polynomial of degree {self.k} over GF({self.p})")

    def _digits(self, code: int, k: int | None = None) -> list[int]:
        k = self.k if k is None else k
        return [(code // self.p**t) % self.p for t in range(k)]

    def _code(self, digits) -> int:
        return sum(int(d) * self.p**t for t, d in enumerate(digits))

    def add(self, a: int, b: int) -> int:
        return self._code((x + y) % self.p for x, y in zip(self._digits(a), self._digits(b)))

    def sub(self, a: int, b: int) -> int:
        return self._code((x - y) % self.p for x, y in zip(self._digits(a), self._digits(b)))

    def mul(self, a: int, b: int) -> int:
        da, db = self._digits(a), self._digits(b)
        prod = [0] * (2 * self.k - 1)
        for i, x in enumerate(da):
            for j, y in enumerate(db):
                prod[i + j] = (prod[i + j] + x * y) % self.p
        return self._code(self._polymod(prod, self.modulus))

    def quadratic_character(self) -> np.ndarray:
        """χ as an int8 array over codes: 0 at 0, +1 on nonzero squares, −1 on non-squares."""
        chi = np.full(self.q, -1, dtype=np.int8)
        chi[0] = 0
        if self.k == 1:
            chi[(np.arange(1, self.q, dtype=np.int64) ** 2) % self.q] = 1
        else:
            chi[[self.mul(x, x) for x in range(1, self.q)]] = 1
        return chi

    def difference_codes(self) -> np.ndarray:
        """(q, q) int64 array D with D[i, j] = code of (element i − element j)."""
        idx = np.arange(self.q, dtype=np.int64)
        if self.k == 1:
            return (idx[:, None] - idx[None, :]) % self.q
        out = np.zeros((self.q, self.q), dtype=np.int64)
        for t in range(self.k):
            d = (idx // self.p**t) % self.p
            out += ((d[:, None] - d[None, :]) % self.p) * self.p**t
        return out


# --------------------------------------------------------------------------- base constructions


def _sylvester(m: int) -> np.ndarray:
    """Sylvester's H_{2^m} = H_2^{⊗m}: entry (i, j) = (−1)^{popcount(i & j)}. int8."""
    h = np.ones((1, 1), dtype=np.int8)
    for _ in range(m):
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(e_i − e_j) over GF(q): Q·Qᵀ = q·I − J, Q·J = 0, Qᵀ = χ(−1)·Q."""
    field = GaloisField(q)
    return field.quadratic_character()[field.difference_codes()]


def paley_matrix(q: int) -> np.ndarray:
    """Paley's Hadamard matrix for a prime power q (int8).

    q ≡ 3 (mod 4): order q+1, H = I + S with the skew conference matrix S = [[0, 1ᵀ], [−1, Q]];
      H·Hᵀ = I + S·Sᵀ = (q+1)·I because Sᵀ = −S and S·Sᵀ = q·I.
    q ≡ 1 (mod 4): order 2(q+1), H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]] with the
      symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] (C·Cᵀ = q·I).
    """
    pk = _prime_power(q)
    if pk is None or pk[0] == 2:
        raise ValueError(f"Paley needs an odd prime power q; got {q}")
    Q = _jacobsthal(q)
    if q % 4 == 3:
        S = np.zeros((q + 1, q + 1), dtype=np.int8)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
        return S + np.eye(q + 1, dtype=np.int8)
    C = np.zeros((q + 1, q + 1), dtype=np.int8)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, Q
    A = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    B = np.array([[1, 1], [1, -1]], dtype=np.int8)
    return np.kron(C, B) + np.kron(np.eye(q + 1, dtype=np.int8), A)


def _circulant(row: np.ndarray) -> np.ndarray:
    """C[i, j] = row[(j − i) mod m]."""
    m = len(row)
    idx = (np.arange(m)[None, :] - np.arange(m)[:, None]) % m
    return row[idx]


def goethals_seidel_matrix(rows: np.ndarray) -> np.ndarray:
    """Order-4m Hadamard matrix from four ±1 sequences (4, m) with Σ_k PAF_k(s) = 0 for s ≠ 0.

    With circulants A, B, C, D (first rows = the sequences) and the back-identity R, the
    Goethals–Seidel array
        [[ A,    BR,    CR,    DR ],
         [-BR,   A,     DᵀR,  -CᵀR],
         [-CR,  -DᵀR,   A,     BᵀR],
         [-DR,   CᵀR,  -BᵀR,   A  ]]
    is Hadamard: the diagonal blocks of H·Hᵀ are A·Aᵀ + B·Bᵀ + C·Cᵀ + D·Dᵀ = 4m·I (the PAF
    condition; R·Rᵀ = I), and the off-diagonal blocks cancel because circulants commute and
    X·R·Yᵀ = Y·R·Xᵀ for circulants X, Y (X·R is a symmetric back-circulant).
    """
    rows = np.asarray(rows, dtype=np.int8)
    A, B, C, D = (_circulant(r) for r in rows)
    R = np.eye(rows.shape[1], dtype=np.int8)[::-1]
    return np.block(
        [
            [A, B @ R, C @ R, D @ R],
            [-B @ R, A, D.T @ R, -C.T @ R],
            [-C @ R, -D.T @ R, A, B.T @ R],
            [-D @ R, C.T @ R, -B.T @ R, A],
        ]
    ).astype(np.int8)


@functools.lru_cache(maxsize=1)
def _gs_sequences() -> dict[int, np.ndarray]:
    """The shipped sequence quadruples {m: (4, m) int8}, checksum- and PAF-verified."""
    raw = (resources.files("rsq") / "data" / GS_DATA_FILE).read_bytes()
    return _parse_gs_data(raw, GS_DATA_SHA256)


def _parse_gs_data(raw: bytes, expected_sha256: str) -> dict[int, np.ndarray]:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise RSQError(
            f"rsq/data/{GS_DATA_FILE} has sha256 {digest}, expected {expected_sha256}: the package "
            "data is corrupt or was edited; reinstall rsq (or regenerate the file with "
            "scripts/find_williamson.py and update GS_DATA_SHA256)"
        )
    out = {}
    for key, entry in json.loads(raw)["sequences"].items():
        rows = np.array([[1 if c == "+" else -1 for c in r] for r in entry["rows"]], dtype=np.int64)
        m = int(key)
        paf = np.stack([(rows * np.roll(rows, -s, axis=1)).sum() for s in range(1, m)])
        if rows.shape != (4, m) or np.any(paf != 0):
            raise RSQError(
                f"rsq/data/{GS_DATA_FILE}: the sequences for m={m} do not satisfy the PAF condition; reinstall rsq"
            )
        out[m] = rows.astype(np.int8)
    return out


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class HadamardSpec:
    """How the Hadamard matrix of order n is built: H_n = H_core ⊗ sylvester(power)."""

    n: int
    kind: str  # human-readable recipe, e.g. "paley1(q=11)⊗sylvester(256)"
    core: int  # K (1 when n is a power of two)
    power: int  # M = n / K, a power of two


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None)
def _core_recipe(K: int) -> tuple | None:
    """Recipe tree for a core order K (a multiple of 4, not a power of two), or None.

    Tree: ("paley1", q) | ("paley2", q) | ("gs", m) | ("kron", left, right). Preference: Paley I,
    Paley II, Goethals–Seidel data, then a Kronecker product of two cores (smallest left factor).
    """
    pk = _prime_power(K - 1)
    if pk is not None and (K - 1) % 4 == 3:
        return ("paley1", K - 1)
    pk = _prime_power(K // 2 - 1)
    if pk is not None and (K // 2 - 1) % 4 == 1:
        return ("paley2", K // 2 - 1)
    if K // 4 in _gs_sequences():
        return ("gs", K // 4)
    for a in range(12, math.isqrt(K) + 1, 4):
        if K % a == 0 and (K // a) % 4 == 0 and not _is_pow2(a) and not _is_pow2(K // a):
            left, right = _core_recipe(a), _core_recipe(K // a)
            if left is not None and right is not None:
                return ("kron", left, right)
    return None


def _recipe_name(tree: tuple) -> str:
    if tree[0] == "kron":
        return f"{_recipe_name(tree[1])}⊗{_recipe_name(tree[2])}"
    if tree[0] == "gs":
        return f"goethals-seidel(m={tree[1]})"
    return f"{tree[0]}(q={tree[1]})"


@functools.lru_cache(maxsize=None)
def _spec_and_tree(n: int) -> tuple[HadamardSpec, tuple | None]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise NoHadamardError(f"a Hadamard order must be a positive integer; got {n!r}")
    if _is_pow2(n):
        return HadamardSpec(n, f"sylvester({n})", 1, n), None
    if n % 4:
        raise NoHadamardError(
            f"no Hadamard matrix of order {n} can exist (orders other than 1, 2 or a multiple of 4 "
            "are impossible); use a random orthogonal rotation for this site (RotationConfig "
            "fallback='random' or mode='random')"
        )
    odd, e = n, 0
    while odd % 2 == 0:
        odd, e = odd // 2, e + 1
    for j in range(2, e + 1):
        K = odd << j
        tree = _core_recipe(K)
        if tree is not None:
            M = n // K
            kind = _recipe_name(tree) + (f"⊗sylvester({M})" if M > 1 else "")
            return HadamardSpec(n, kind, K, M), tree
    cores = ", ".join(str(odd << j) for j in range(2, e + 1))
    raise NoHadamardError(
        f"no Hadamard matrix of order {n} is known to rsq: none of the core orders K = {cores} "
        f"(n = K·2^m) has a Paley I/II, Goethals–Seidel (sequence data for m in "
        f"{sorted(_gs_sequences())}) or Kronecker construction; use a random orthogonal rotation "
        "for this site (RotationConfig fallback='random' or mode='random')"
    )


def hadamard_spec(n: int) -> HadamardSpec:
    """The recipe for order n; raises NoHadamardError if there is none (cheap: builds nothing)."""
    return _spec_and_tree(n)[0]


def hadamard_kind(n: int) -> str:
    """Human-readable recipe, e.g. ``"sylvester(512)"`` or ``"paley1(q=11)⊗sylvester(256)"``."""
    return hadamard_spec(n).kind


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order n."""
    try:
        hadamard_spec(n)
    except NoHadamardError:
        return False
    return True


def _build_tree(tree: tuple) -> np.ndarray:
    if tree[0] == "kron":
        return np.kron(_build_tree(tree[1]), _build_tree(tree[2]))
    if tree[0] == "gs":
        return goethals_seidel_matrix(_gs_sequences()[tree[1]])
    return paley_matrix(tree[1])


@functools.lru_cache(maxsize=64)
def _core_matrix(K: int) -> torch.Tensor:
    """H_K as int8 (K = 1 gives [[1]]). Cached; never handed out (callers get copies)."""
    if K == 1:
        return torch.ones(1, 1, dtype=torch.int8)
    tree = _core_recipe(K)
    assert tree is not None, K
    log.debug("building the core Hadamard matrix of order %d: %s", K, _recipe_name(tree))
    return torch.from_numpy(_build_tree(tree))


@functools.lru_cache(maxsize=16)
def _sylvester_t(M: int) -> torch.Tensor:
    return torch.from_numpy(_sylvester(M.bit_length() - 1))


def hadamard_matrix(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order n (float64, (n, n)), H·Hᵀ = n·I, H = H_K ⊗ sylvester(n/K).

    Deterministic: the same n always gives the same matrix (:func:`hadamard_kind` names it).
    Raises NoHadamardError when none is known or none can exist. Returns a fresh tensor.
    """
    spec = hadamard_spec(n)
    core = _core_matrix(spec.core).double()
    if spec.power == 1:
        return core  # .double() of the int8 cache is already a copy
    return torch.kron(core, _sylvester_t(spec.power).double())


def two_factors(n: int, max_cols: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) float64 ±1 with L ⊗ R = :func:`hadamard_matrix` (n) and R = sylvester(Q), Q the
    largest power of two <= max_cols dividing the Sylvester part: L = H_K ⊗ sylvester(M/Q).

    A row x viewed row-major as an (n/Q) × Q matrix X then has (L ⊗ R)·x = L·X·Rᵀ: two small
    products (the GPU kernel of rsq/kernels/triton_hadamard.py). Raises NoHadamardError like
    :func:`hadamard_matrix`."""
    spec = hadamard_spec(n)
    q = min(spec.power, max_cols)
    L = torch.kron(_core_matrix(spec.core).double(), _sylvester_t(spec.power // q).double())
    return L, _sylvester_t(q).double()


# --------------------------------------------------------------------------- random rotations


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Orthogonal Q = diag(s)·H_n/√n (float64, (n, n)), Q·Qᵀ = I.

    s ∈ {±1}^n comes from ``torch.Generator().manual_seed(seed)``: reproducible and independent
    of the global RNG.
    """
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).double().mul_(2).sub_(1)
    H = hadamard_matrix(n)
    return H.mul_((signs / math.sqrt(n))[:, None])


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal (n, n) float64: Q of the QR of a seeded Gaussian, with the signs of
    Q's columns fixed so that diag(R) > 0 (this makes the distribution Haar)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(n, n, generator=gen, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign[None, :]


# --------------------------------------------------------------------------- fast transform


@functools.lru_cache(maxsize=32)
def _core_on(K: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_K/√n in ``dtype`` on ``device`` (the whole normalization folded into the small factor).
    Built outside inference mode so that the cached tensor also works under autograd later."""
    with torch.inference_mode(False):
        return (_core_matrix(K).double() / math.sqrt(n)).to(device=device, dtype=dtype)


def _fwht(y: torch.Tensor, writable: bool = False) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) along the last dim of (R, K, M).

    Stage h applies I ⊗ H_2 ⊗ I_h: pairs (i, i+h) inside blocks of 2h become (a+b, a−b). The
    product of all stages is H_2^{⊗m} = sylvester(M): log2(M) stages, O(n log M) additions.
    Without autograd the stages ping-pong between two buffers (no allocation per stage, about 3×
    faster on CPU than building each stage with torch.stack); y itself is one of them only if
    ``writable``. With autograd the stages stack.
    """
    R, K, M = y.shape
    if M == 1:
        return y
    if torch.is_grad_enabled() and y.requires_grad:
        h = 1
        while h < M:
            v = y.view(R, K, M // (2 * h), 2, h)
            y = torch.stack((v[:, :, :, 0] + v[:, :, :, 1], v[:, :, :, 0] - v[:, :, :, 1]), dim=3)
            h *= 2
        return y.view(R, K, M)
    src, dst = y, torch.empty_like(y)
    fresh = not writable  # y must not be overwritten: the 2nd buffer is allocated after stage 1
    h = 1
    while h < M:
        s = src.view(R, K, M // (2 * h), 2, h)
        d = dst.view(R, K, M // (2 * h), 2, h)
        torch.add(s[:, :, :, 0], s[:, :, :, 1], out=d[:, :, :, 0])
        torch.sub(s[:, :, :, 0], s[:, :, :, 1], out=d[:, :, :, 1])
        src, dst = dst, (torch.empty_like(y) if fresh and src is y else src)
        h *= 2
    return src


def hadamard_transform(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """y = x @ (H_n/√n)ᵀ along the last dim: the normalized Hadamard applied to each row vector.

    x: (..., n), any device; float64 is computed in float64, everything else in float32, and the
    result has x's dtype. H_n is exactly :func:`hadamard_matrix` (n): with x viewed as (K, M),
    (H_K ⊗ H_M)·x = H_K·X·H_M, so a butterfly pass over M and one K×K matmul (K small). Every
    recipe has this structure (a Kronecker core is just a denser H_K), so there is no dense
    n×n fallback. Cost per row: n·log2(M) additions + n·K multiply-adds.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"hadamard_transform: the last dim of x is {x.shape[-1]}, expected n={n}")
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor; got {x.dtype}")
    spec = hadamard_spec(n)
    K, M = spec.core, spec.power
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-1]
    y = x.reshape(-1, K, M).to(compute).contiguous()  # (R, K, M): row-major split of the last dim
    y = _fwht(y, writable=y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
    if K > 1:
        # (H_K/√n)·X for every row r: matmul broadcasts the (K, K) factor over R
        y = torch.matmul(_core_on(K, n, compute, y.device), y)
    else:
        y = y * (1.0 / math.sqrt(n))
    return y.reshape(*lead, n).to(x.dtype)


def sylvester_block(n: int) -> int:
    """The largest power of two dividing n: the block of the block-diagonal Sylvester Hadamard
    I_{n/b} ⊗ H_b/√b of order n (e.g. 14336 -> 2048, 18944 -> 512, 1536 -> 512)."""
    if n < 1:
        raise ValueError(f"sylvester_block needs n >= 1, got {n}")
    return n & -n


def block_hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """y = x @ (I ⊗ H_b/√b)ᵀ along the last dim: the Hadamard matrix H_b of :func:`hadamard_matrix`
    on every contiguous block of ``block`` features (``block`` divides the last dim). For a power of
    two, H_b is Sylvester's: the matrix compressed-tensors' ``hadamard`` transform builds with
    ``head_dim=block``, which serving engines apply online; other orders (H_K ⊗ sylvester) are
    stored with the export as a dense block. Precision as :func:`hadamard_transform`."""
    n = x.shape[-1]
    if block < 1 or n % block:
        raise ValueError(f"block_hadamard_transform: block {block} must divide {n}")
    if not x.is_floating_point():
        raise TypeError(f"block_hadamard_transform needs a floating-point tensor; got {x.dtype}")
    if not _is_pow2(block):
        lead = x.shape[:-1]
        return hadamard_transform(x.reshape(*lead, n // block, block), block).reshape(*lead, n)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-1]
    y = x.reshape(-1, n // block, block).to(compute).contiguous()
    y = _fwht(y, writable=y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
    return (y * (1.0 / math.sqrt(block))).reshape(*lead, n).to(x.dtype)
