"""Hadamard constructions, random rotations and the fast transform (rsq.rotation.hadamard).

Oracles: the defining identity H·Hᵀ = n·I checked in integer arithmetic (int64, or float64 where
every product and partial sum is an integer below 2^53, hence exact); Sylvester's closed form
H[i, j] = (−1)^popcount(i & j); the dense matrix for the fast transform.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rsq.errors import NoHadamardError, RSQError
from rsq.rotation import hadamard as had
from rsq.rotation.hadamard import (
    GaloisField,
    goethals_seidel_matrix,
    hadamard_kind,
    hadamard_matrix,
    hadamard_spec,
    hadamard_transform,
    has_hadamard,
    paley_matrix,
    random_hadamard,
    random_orthogonal,
)

CORE_ORDERS = [12, 20, 28, 36, 40, 52, 60, 108, 140, 148, 156, 172]
# hidden / intermediate sizes of Qwen2.5, Llama-3, Mistral-Nemo that are not powers of two
MID_ORDERS = [896, 3584, 4864, 5120]  # dense matrix built (≤ 210 MB) and checked
BIG_ORDERS = [8960, 11008, 13824, 14336, 18944, 27648, 29568]  # dense would be 0.6–7 GB


def assert_hadamard_exact(H: torch.Tensor) -> None:
    """Entries ±1 and H·Hᵀ == n·I in int64 (exact)."""
    n = H.shape[0]
    assert H.shape == (n, n)
    Hi = H.to(torch.int64)
    assert torch.equal(Hi.double(), H.double()), "entries are not integers"
    assert torch.equal(Hi.abs(), torch.ones_like(Hi)), "entries are not ±1"
    assert torch.equal(Hi @ Hi.T, n * torch.eye(n, dtype=torch.int64))


def sylvester_oracle(M: int) -> torch.Tensor:
    """(−1)^popcount(i & j), float64 — independent of the library's Kronecker build."""
    i = torch.arange(M)
    both = i[:, None] & i[None, :]
    parity = torch.zeros(M, M, dtype=torch.int64)
    for b in range(max(M.bit_length(), 1)):
        parity ^= (both >> b) & 1
    return (1 - 2 * parity).double()


# ----------------------------------------------------------------------------- constructions


@pytest.mark.parametrize("n", CORE_ORDERS)
def test_core_orders_exact(n):
    H = hadamard_matrix(n)
    assert H.dtype == torch.float64
    assert_hadamard_exact(H)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 512])
def test_sylvester_matches_closed_form(n):
    assert hadamard_kind(n) == f"sylvester({n})"
    assert torch.equal(hadamard_matrix(n), sylvester_oracle(n))


@pytest.mark.parametrize("n", MID_ORDERS)
def test_model_orders_dense(n):
    """H_n equals H_K ⊗ sylvester(M) elementwise with H_K exact; then H·Hᵀ = (H_K·H_Kᵀ) ⊗ (H_M·H_Mᵀ)
    = n·I follows. A full n³ Gram matrix costs 5–20 s here, so the Gram identity of the big matrix
    itself is checked by Freivalds' test: H·(Hᵀ·v) == n·v for random ±1 vectors v (float64 exact:
    integer sums ≤ n² < 2^53). A wrong Gram passes one probe with probability ≤ 1/2; 16 probes."""
    spec = hadamard_spec(n)
    assert spec.core * spec.power == n and spec.power & (spec.power - 1) == 0
    HK = hadamard_matrix(spec.core)
    assert_hadamard_exact(HK)
    H = hadamard_matrix(n)
    assert torch.equal(H, torch.kron(HK, sylvester_oracle(spec.power)))
    g = torch.Generator().manual_seed(n)
    V = (torch.randint(0, 2, (n, 16), generator=g) * 2 - 1).double()
    assert torch.equal(H @ (H.T @ V), n * V)


def test_full_gram_896():
    H = hadamard_matrix(896)
    assert torch.equal(H @ H.T, 896 * torch.eye(896, dtype=torch.float64))  # exact: integers < 2^53


@pytest.mark.parametrize("n", BIG_ORDERS)
def test_model_orders_structure(n):
    """Too big to build densely in a unit test. Check the factors exactly, and that the fast
    transform applies exactly H_K ⊗ sylvester(M) (the matrix hadamard_matrix(n) would return):
    its outputs on unit vectors e_j are columns j of H_n/√n, compared against the closed forms."""
    spec = hadamard_spec(n)
    K, M = spec.core, spec.power
    assert K * M == n and M & (M - 1) == 0 and K <= 1000
    HK = hadamard_matrix(K)
    assert_hadamard_exact(HK)
    g = torch.Generator().manual_seed(n)
    cols = torch.randint(0, n, (6,), generator=g)
    E = torch.zeros(len(cols), n, dtype=torch.float64)
    E[torch.arange(len(cols)), cols] = 1.0
    Y = hadamard_transform(E) * n**0.5  # rows: columns j of H_n
    i = torch.arange(n)
    for r, j in enumerate(cols.tolist()):
        both = (i % M) & (j % M)
        parity = torch.zeros_like(both)
        for b in range(M.bit_length()):
            parity ^= (both >> b) & 1
        expected = HK[i // M, j // M] * (1 - 2 * parity).double()
        torch.testing.assert_close(Y[r], expected, rtol=0, atol=1e-9)  # values ±1; fp64 rounding
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    norms = hadamard_transform(x).norm(dim=-1)
    torch.testing.assert_close(norms, x.norm(dim=-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "n,kind",
    [
        (512, "sylvester(512)"),
        (12, "paley1(q=11)"),
        (28, "paley1(q=27)"),
        (52, "paley2(q=25)"),
        (156, "goethals-seidel(m=39)"),
        (172, "goethals-seidel(m=43)"),
        (896, "paley1(q=27)⊗sylvester(32)"),
        (1536, "paley1(q=11)⊗sylvester(128)"),
        (4864, "paley2(q=37)⊗sylvester(64)"),
        (11008, "goethals-seidel(m=43)⊗sylvester(64)"),
        (18944, "paley2(q=73)⊗sylvester(128)"),
        (29568, "paley2(q=461)⊗sylvester(32)"),
    ],
)
def test_recipes(n, kind):
    assert has_hadamard(n)
    assert hadamard_kind(n) == kind


@pytest.mark.parametrize("n", [3, 5, 6, 9, 10, 14, 18, 22, 30, 0, -4])
def test_impossible_orders_raise(n):
    assert not has_hadamard(n)
    with pytest.raises(NoHadamardError, match=str(n)):
        hadamard_matrix(n)
    with pytest.raises(NoHadamardError):
        hadamard_kind(n)
    if n > 0:
        with pytest.raises(NoHadamardError):
            hadamard_transform(torch.zeros(2, n))


@pytest.mark.parametrize("n", [6, 9, 14, 18])
def test_impossible_message_says_why(n):
    with pytest.raises(NoHadamardError, match="can exist"):
        hadamard_matrix(n)


def test_unknown_order_message():
    # 668 = 4·167: 667 = 23·29 and 333 = 9·37 are not prime powers, no sequences for m = 167
    assert not has_hadamard(668)
    with pytest.raises(NoHadamardError, match="668.*known"):
        hadamard_matrix(668)


# ----------------------------------------------------------------------------- Paley / GF(q)


@pytest.mark.parametrize(
    "q,order", [(3, 4), (11, 12), (27, 28), (243, 244), (5, 12), (9, 20), (25, 52), (49, 100), (125, 252)]
)
def test_paley_prime_powers(q, order):
    H = torch.from_numpy(paley_matrix(q))
    assert H.shape == (order, order)
    assert_hadamard_exact(H)


@pytest.mark.parametrize("q", [4, 8, 9, 25, 27, 49, 121])
def test_galois_field_axioms(q):
    """Nonzero elements form a group under mul (each row of the table a permutation of 1..q-1),
    distributivity on all triples (small q), x − x = 0, and exactly (q−1)/2 nonzero squares."""
    F = GaloisField(q)
    table = [[F.mul(a, b) for b in range(q)] for a in range(q)]
    for a in range(1, q):
        assert sorted(table[a][1:]) == list(range(1, q))
        assert table[1][a] == a and table[0][a] == 0
    if q <= 27:
        for a in range(q):
            for b in range(q):
                for c in range(q):
                    assert table[a][F.add(b, c)] == F.add(table[a][b], table[a][c])
    assert all(F.sub(a, a) == 0 for a in range(q))
    if q % 2:
        chi = F.quadratic_character()
        assert (chi == 1).sum() == (q - 1) // 2 and (chi == -1).sum() == (q - 1) // 2


def test_galois_field_rejects_non_prime_power():
    with pytest.raises(ValueError, match="prime power"):
        GaloisField(12)
    with pytest.raises(ValueError):
        paley_matrix(15)


# ----------------------------------------------------------------------------- Goethals–Seidel data


def test_gs_data_checksum_and_content():
    raw = (had.resources.files("rsq") / "data" / had.GS_DATA_FILE).read_bytes()
    seqs = had._parse_gs_data(raw, had.GS_DATA_SHA256)
    assert {39, 43} <= set(seqs)
    for m, rows in seqs.items():
        assert_hadamard_exact(torch.from_numpy(goethals_seidel_matrix(rows)))


def test_gs_data_tampering_detected():
    raw = (had.resources.files("rsq") / "data" / had.GS_DATA_FILE).read_bytes()
    with pytest.raises(RSQError, match="sha256"):
        had._parse_gs_data(raw + b" ", had.GS_DATA_SHA256)
    # a valid checksum over sequences that violate the PAF condition is caught too
    data = json.loads(raw)
    row = data["sequences"]["39"]["rows"][0]
    data["sequences"]["39"]["rows"][0] = ("-" if row[0] == "+" else "+") + row[1:]
    bad = json.dumps(data).encode()
    with pytest.raises(RSQError, match="PAF"):
        had._parse_gs_data(bad, had.hashlib.sha256(bad).hexdigest())


# ----------------------------------------------------------------------------- fast transform

FAST_ORDERS = [1, 2, 12, 28, 64, 96, 156, 172, 576, 896, 1536]


@pytest.mark.parametrize("n", FAST_ORDERS)
def test_fast_transform_matches_dense_float64(n):
    """Tolerance 1e-12 relative to max|y|: both sides round O(log n + K) (fast) or O(n) (dense)
    float64 additions of unit-scale terms, ~1e-15 each."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    ref = x @ (hadamard_matrix(n) / n**0.5).T
    y = hadamard_transform(x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert (y - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert torch.equal(hadamard_transform(x, n), y)


def test_fast_transform_noncontiguous_and_input_untouched():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(576, 7, generator=g, dtype=torch.float64)
    x = base.T  # (7, 576), non-contiguous
    before = base.clone()
    y = hadamard_transform(x)
    ref = x @ (hadamard_matrix(576) / 24.0).T
    assert (y - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert torch.equal(base, before)
    for dtype in (torch.float32, torch.float64):  # contiguous: the compute buffer aliases x
        x = torch.randn(3, 1536, generator=g).to(dtype)
        before = x.clone()
        hadamard_transform(x)
        assert torch.equal(x, before)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
@pytest.mark.parametrize("n", [64, 576, 1536])
def test_fast_transform_low_precision(dtype, rtol, n):
    """Half types are computed in float32 and rounded once on output, so the error vs the float64
    transform of the same (rounded) input is ≤ one output rounding (2^-8 bf16, 2^-11 fp16, relative)
    plus float32 accumulation (≤ 1e-5 of max|y|); float32 itself: ≤ 1e-5 of max|y|."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, generator=g).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype
    ref = hadamard_transform(x.double())
    err = (y.double() - ref).abs()
    bound = (rtol * ref.abs() if dtype != torch.float32 else 0) + 1e-5 * ref.abs().max()
    assert torch.all(err <= bound)


def test_fast_transform_bad_input():
    with pytest.raises(ValueError, match="last dim"):
        hadamard_transform(torch.zeros(3, 64), 32)
    with pytest.raises(TypeError):
        hadamard_transform(torch.zeros(3, 64, dtype=torch.int64))


def test_fast_transform_autograd():
    """The gradient of Σ y is the column sums of H/√n (the transform is linear)."""
    x = torch.randn(3, 96, dtype=torch.float64, requires_grad=True)
    hadamard_transform(x).sum().backward()
    expected = (hadamard_matrix(96) / 96**0.5).sum(0).expand(3, 96)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_transform_cuda_matches_cpu():
    x = torch.randn(8, 1536, dtype=torch.float64)
    y = hadamard_transform(x.cuda()).cpu()
    torch.testing.assert_close(y, hadamard_transform(x), rtol=1e-12, atol=1e-12)
    xb = x.to(torch.bfloat16)
    y = hadamard_transform(xb.cuda())
    assert y.dtype == torch.bfloat16 and y.is_cuda


# ----------------------------------------------------------------------------- random rotations


@pytest.mark.parametrize("n", [64, 96, 156])
def test_random_hadamard(n):
    """Q·Qᵀ = I to 1e-12 (entries ±1/√n, n float64 products per entry); Q = diag(s)·H/√n."""
    Q = random_hadamard(n, seed=3)
    assert Q.dtype == torch.float64
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    ratio = Q * n**0.5 / hadamard_matrix(n)  # ±1, constant along each row
    ones = torch.ones(n, n, dtype=torch.float64)
    torch.testing.assert_close(ratio.abs(), ones, rtol=0, atol=1e-12)
    assert torch.equal(ratio, ratio[:, :1].expand(n, n))
    assert (ratio[:, 0] < 0).any() and (ratio[:, 0] > 0).any()


def test_random_hadamard_seeded_and_independent_of_global_rng():
    torch.manual_seed(0)
    a = random_hadamard(128, seed=7)
    torch.manual_seed(12345)
    torch.rand(100)
    b = random_hadamard(128, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_hadamard(128, seed=8))


@pytest.mark.parametrize("n", [1, 7, 50, 128])
def test_random_orthogonal(n):
    """Q·Qᵀ = I to 1e-12 (Householder QR in float64 is backward stable, error ~ n·eps)."""
    torch.manual_seed(0)
    Q = random_orthogonal(n, seed=5)
    torch.manual_seed(99)
    assert torch.equal(Q, random_orthogonal(n, seed=5))
    assert Q.dtype == torch.float64
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    if n > 1:
        assert not torch.equal(Q, random_orthogonal(n, seed=6))


def test_random_orthogonal_sign_fix():
    """diag(R) > 0: R = Qᵀ·G for the same Gaussian G must have a positive diagonal."""
    g = torch.Generator().manual_seed(11)
    G = torch.randn(40, 40, generator=g, dtype=torch.float64)
    Q = random_orthogonal(40, seed=11)
    R = Q.T @ G
    assert torch.all(torch.diagonal(R) > 0)
    zeros = torch.zeros(40, 40, dtype=torch.float64)
    torch.testing.assert_close(torch.tril(R, -1), zeros, rtol=0, atol=1e-10)  # ~n·eps·|G|


def test_returned_matrices_are_fresh():
    H = hadamard_matrix(12)
    H.zero_()
    assert_hadamard_exact(hadamard_matrix(12))
    H = hadamard_matrix(64)
    H.zero_()
    assert_hadamard_exact(hadamard_matrix(64))


@pytest.mark.parametrize("n", [4096, 14336, 1536, 576, 256, 12, 11008])
def test_two_factors_kronecker_is_the_hadamard_matrix(n):
    # the GPU kernel's view of a row (L·X·Rᵀ) is exact only if L ⊗ R is exactly H_n
    from rsq.rotation.hadamard import two_factors

    L, R = two_factors(n)
    assert R.shape[0] == min(hadamard_spec(n).power, 128)
    assert torch.equal(torch.kron(L, R), hadamard_matrix(n))


@pytest.mark.parametrize("n", [96, 1536, 14336, 18944, 64])
def test_block_hadamard_is_compressed_tensors_block_diagonal_sylvester(n):
    # oracle: compressed-tensors' own Sylvester matrix, block-diagonal (what its `hadamard`
    # transform with head_dim=block builds), applied densely in float64
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    from rsq.rotation.hadamard import block_hadamard_transform, sylvester_block

    b = sylvester_block(n)
    assert n % b == 0 and (n // b) % 2 == 1  # the largest power of two
    Hb = deterministic_hadamard_matrix(b, torch.float64) / math.sqrt(b)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    dense = torch.block_diag(*[Hb] * (n // b)) if n <= 2048 else None
    got = block_hadamard_transform(x, b)
    ref = x @ dense.T if dense is not None else (x.reshape(3, n // b, b) @ Hb.T).reshape(3, n)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    # orthogonal: norms kept (float64 rounding only)
    assert torch.allclose(got.norm(dim=1), x.norm(dim=1), rtol=1e-12)


@pytest.mark.parametrize(
    "n,b,symmetric",
    # 1216 = 76 x 16: a paley2 core, symmetric; the others' cores (paley1, ...) are not
    [
        (96, 48, False),
        (96, 96, False),
        (1536, 768, False),
        (1536, 1536, False),
        (8960, 1792, False),
        (4864, 1216, True),
    ],
)
def test_block_hadamard_non_pow2_block_is_the_explicit_block_diagonal(n, b, symmetric):
    # --export-block: oracle = the explicit block-diagonal I ⊗ H_b/√b with H_b = hadamard_matrix(b)
    # (H_K ⊗ sylvester), applied densely in float64; leading dims of any shape. Tolerance 1e-12:
    # float64 rounding of sums of at most b products (|x| ~ 1, b <= 1792: ~1e-14 measured)
    from rsq.kernels.hadamard import hadamard_rotate
    from rsq.rotation.hadamard import block_hadamard_transform

    Hb = hadamard_matrix(b) / math.sqrt(b)
    assert torch.equal(Hb, Hb.T) == symmetric  # where not symmetric, the check below fixes the orientation
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(b))
    got = block_hadamard_transform(x, b)
    if n <= 1536:
        ref = x @ torch.block_diag(*[Hb] * (n // b)).T
    else:  # the same product, one block at a time (a dense n x n would be 640 MB at 8960)
        ref = (x.reshape(2, 3, n // b, b) @ Hb.T).reshape(2, 3, n)
    assert got.shape == x.shape and torch.allclose(got, ref, rtol=0, atol=1e-12)
    # the online rotation's entry point (rsq/kernels/hadamard.py: block never goes to Triton)
    assert torch.equal(hadamard_rotate(x, "block", n, b), got)
    # float32 and bfloat16 inputs: computed in float32, returned in the input's dtype
    got32 = block_hadamard_transform(x.float(), b)
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), ref, rtol=0, atol=1e-5)
    assert block_hadamard_transform(x.to(torch.bfloat16), b).dtype == torch.bfloat16


def test_block_hadamard_refuses_a_block_that_does_not_divide():
    from rsq.rotation.hadamard import block_hadamard_transform

    with pytest.raises(ValueError, match="block 40 must divide 96"):
        block_hadamard_transform(torch.zeros(2, 96), 40)


def test_export_block_choice_and_config_error():
    from rsq.errors import ConfigError
    from rsq.rotation.rotate import export_block

    assert export_block(8960, 0) == 256 and export_block(1536, 0) == 512  # auto: largest power of two
    assert export_block(8960, 1792) == 1792 and export_block(8960, 8960) == 8960
    with pytest.raises(ConfigError) as err:
        export_block(96, 40)  # does not divide
    msg = str(err.value)
    assert "\n" not in msg and "--export-block 40" in msg
    # the orders offered are exactly the Hadamard orders dividing 96, each of which the transform takes
    offered = [int(v) for v in msg.split("one of ")[1].split(", ")]
    assert offered == [4, 8, 12, 16, 24, 32, 48, 96]
    with pytest.raises(ConfigError, match="use 0 \\(auto: 32\\)"):
        export_block(96, 6)  # divides, but no Hadamard of order 6 exists


def test_compiled_path_op_runs_a_non_pow2_block():
    # rsq::hadamard (the op torch.compile'd decoding calls, rsq/kernels/ops.py) on a --export-block
    # of 768 = paley1(q=11) ⊗ sylvester(64): the same values as the eager transform, a fresh tensor
    from rsq.kernels import ops  # noqa: F401  (registers rsq::hadamard)
    from rsq.rotation.hadamard import block_hadamard_transform

    x = torch.randn(2, 5, 1536, generator=torch.Generator().manual_seed(0))
    got = torch.ops.rsq.hadamard(x, "block", 1536, 768)
    assert torch.equal(got, block_hadamard_transform(x, 768)) and got.data_ptr() != x.data_ptr()
