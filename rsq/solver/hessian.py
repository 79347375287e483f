"""Streaming accumulation of the importance-weighted GPTQ Hessian (spec §4).

H = (2/N) * sum_seq sum_t w_t x_t x_t^T, where N counts sequences and the per-token weights w of
each sequence have mean 1 (so every sequence carries the same total weight). Features are scaled by
sqrt(w_t) before the outer product. Accumulated in float32 (or float64 if asked).
"""

from __future__ import annotations

import math

import torch

from rsq.kernels import has_triton

# A capability probe, not a switch: whether torch.addmm(..., out_dtype=float32, out=sum) works in
# this torch (set False on its first failure; the fallback adds a temporary product).
_addmm_into_works = True


def hessian_arithmetic(matmul: str) -> dict:
    """HessianAccumulator's arguments for ``SolverConfig.hessian_matmul``. ``auto`` is ``fp16`` where the
    half path runs (CUDA, bf16/fp16 activations; session 17: the split's quality on SmolLM2 over 3 seeds,
    -15 % of the 8B command's wall on an H100) and the float32 path elsewhere; split/single/fp16 named
    explicitly also run off CUDA, emulated (float32 matmuls of the same half factors)."""
    return {
        "half_inputs": matmul != "fp32",
        "weighted_parts": 1 if matmul in ("single", "fp16", "auto") else 2,
        "emulate": matmul in ("split", "single", "fp16"),
        "single_dtype": torch.float16 if matmul in ("fp16", "auto") else None,
    }


class HessianAccumulator:
    """Accumulates sum_t w_t x_t x_t^T over batches of sequences.

    add(x, weights): x is (B, T, d) (or (T, d) for one sequence), weights (B, T) or None (= all
    ones). With weights None or exactly one, the result is bit-identical to plain GPTQ's.
    """

    def __init__(
        self,
        width: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        half_inputs: bool = False,
        kernels: str = "auto",
        weighted_parts: int = 2,
        emulate: bool = False,
        single_dtype: torch.dtype | None = None,
    ):
        """kernels: "auto" splits the weighted half activations with a Triton kernel on CUDA
        (rsq/kernels/triton_hessian.py); "reference" with torch (the kernel's oracle).
        weighted_parts (half path): 2 = w ⊙ x as hi + lo half parts (two products, exact to ~2^-16),
        1 = one product, the Gram matrix of half(sqrt(w) ⊙ x) (each weighted feature rounded once
        more to the activations' half type: 2^-8 relative for bf16).
        single_dtype (one part): the type the scaled features are rounded to: None = the activations'
        own; torch.float16 for bf16 activations = 2^-11 relative instead of bf16's 2^-8 at the same
        tensor-core rate (each batch scaled by a power of two into fp16's range first, and the product
        scaled back exactly: _fp16_scale).
        emulate: take the half path off CUDA too, its products as float32 matmuls of the same half
        factors (exact products, float32 sums: what the tensor cores compute, up to the order
        of the sums), so the CPU can show what the GPU's arithmetic does to a run."""
        if weighted_parts not in (1, 2):
            raise ValueError(f"weighted_parts must be 1 or 2, not {weighted_parts}")
        self.width = width
        self.kernels = kernels
        self.dtype = dtype
        self.parts = weighted_parts
        self.single_dtype = single_dtype
        self.sum = torch.zeros(width, width, device=device, dtype=dtype)
        self.nseq = 0
        # GPU fast path: products of bf16/fp16 activations on the tensor cores, fp32 accumulation
        self.half_inputs = half_inputs and (self.sum.is_cuda or emulate) and dtype == torch.float32

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        if x.dim() == 2:
            x = x.unsqueeze(0)
            weights = None if weights is None else weights.unsqueeze(0)
        batch = x.shape[0]
        if self.half_inputs and x.dtype in (torch.bfloat16, torch.float16) and _half_mm_ok(self.sum.device):
            self._add_half(x.reshape(-1, self.width), weights)
            self.nseq += batch
            return
        x = x.reshape(batch, -1, x.shape[-1]).to(self.sum.device, self.dtype)
        if weights is not None:
            # sqrt(w) on the features: H gains w_t x_t x_t^T (sqrt(1) == 1 exactly)
            x = x * weights.to(self.sum.device, self.dtype).sqrt().reshape(batch, -1, 1)
        flat = x.reshape(-1, self.width)  # (B*T, d)
        self.sum.addmm_(flat.T, flat)
        self.nseq += batch

    def _add_half(self, flat: torch.Tensor, weights: torch.Tensor | None) -> None:
        """H += X^T (w ⊙ X) with X the exact half-precision activations (T, d). w ⊙ X is split into
        hi + lo half parts (hi = half(w⊙x), lo = half(w⊙x - hi)), so the weighting is exact to
        ~2^-16 relative while every product runs on the tensor cores with fp32 accumulation; with
        one part (weighted_parts=1), one product: the Gram matrix of half(sqrt(w) ⊙ x)."""
        xt = flat.T
        if weights is None:
            self._accumulate(xt, flat)
            return
        w = weights.reshape(-1).to(flat.device, torch.float32)
        if self.parts == 1:
            # one product: the Gram matrix of y = half(sqrt(w) ⊙ x), so H stays symmetric positive
            # semi-definite (rounding only w ⊙ x on one side breaks that: X^T half(w ⊙ X) is not
            # symmetric, and its mirrored triangle was indefinite beyond any damping on SmolLM2)
            s, alpha = w.sqrt(), 1.0
            out = self.single_dtype or flat.dtype
            if out == torch.float16:  # fp16's range is 2^-14..65504: scale the batch into it
                c = _fp16_scale(flat, s)
                s, alpha = s * c, 1.0 / (c * c)  # powers of two: exact in both directions
            y = self._weighted(flat, s, with_lo=False, out_dtype=out)[0]
            self._accumulate(y.T, y, alpha)
            return
        hi, lo = self._weighted(flat, w, with_lo=True)
        self._accumulate(xt, hi)
        self._accumulate(xt, lo)

    def _weighted(self, flat: torch.Tensor, w: torch.Tensor, with_lo: bool, out_dtype: torch.dtype | None = None):
        """hi = half(w ⊙ x) and lo = half(w ⊙ x - hi) (None unless ``with_lo``), in ``out_dtype``
        (default: x's)."""
        out_dtype = out_dtype or flat.dtype
        if self.kernels == "auto" and has_triton() and flat.is_cuda and flat.is_contiguous():
            from rsq.kernels.triton_hessian import split_weighted

            return split_weighted(flat, w, with_lo=with_lo, out_dtype=out_dtype)
        y = flat.float() * w[:, None]
        hi = y.to(out_dtype)
        return hi, (y - hi.float()).to(out_dtype) if with_lo else None

    def _accumulate(self, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
        """sum += alpha * (a @ b), upper block triangle only (a @ b is symmetric up to the lo part's rounding,
        so finalize mirrors the upper triangle): with k x k blocks, k(k+1)/2 of the k² block products
        as k strip products, e.g. 10/16 of the flops for down_proj's 14336 = 4 x 3584. Float32
        accumulation into sum itself (cuBLAS beta = 1: no temporary product), or through a temporary
        where this torch lacks that."""
        for r0, r1 in _block_edges(self.width):  # block row i: its diagonal block and all to the right
            self._addmm(self.sum[r0:r1, r0:], a[r0:r1], b[:, r0:], alpha)

    def _addmm(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
        global _addmm_into_works
        if not out.is_cuda:  # the emulation: exact products of the half factors, float32 sums
            out.addmm_(a.float(), b.float(), alpha=alpha)
            return
        if _addmm_into_works:
            try:
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out, alpha=alpha)
                return
            except (RuntimeError, TypeError):
                _addmm_into_works = False
        out.add_(torch.mm(a, b, out_dtype=torch.float32), alpha=alpha)

    def finalize(self) -> torch.Tensor:
        """(2/N) * sum, float32."""
        if self.nseq == 0:
            raise RuntimeError("no calibration data reached this module")
        H = self.sum
        if self.half_inputs:
            # the half path adds the upper block triangle only (every path adds at least the upper
            # triangle): mirror it
            H = H.triu() + H.triu(1).T
        return (H * (2.0 / self.nseq)).float()


FP16_TOP = 14  # _fp16_scale puts a batch's largest scaled feature below 2^14 (fp16's largest: 65504)


def _fp16_scale(flat: torch.Tensor, s: torch.Tensor) -> float:
    """The power of two c that puts max_t s_t |x_t| in [2^13, 2^14): fp16 holds c s x with 11
    significant bits down to 2^-14 (below that, subnormals: absolute error 2^-25), without overflow.
    1 for an all-zero or non-finite batch (non-finite calibration is refused before this)."""
    lo, hi = torch.aminmax(flat, dim=1)  # per token, no (T, d) temporary
    amax = (torch.maximum(hi.float(), -lo.float()) * s).max().item()  # the one host sync per batch
    if not math.isfinite(amax) or amax <= 0:
        return 1.0
    e = math.frexp(amax)[1]  # amax = m 2^e with m in [0.5, 1)
    return 2.0 ** max(-120, min(120, FP16_TOP - e))


MIN_BLOCK = 2048  # the half path's Hessian products use blocks of at least this width (at most 4)


def _block_edges(width: int) -> list[tuple[int, int]]:
    k = max(1, min(4, width // MIN_BLOCK))
    cuts = [round(i * width / k) for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


_HALF_MM: dict = {}


def _half_mm_ok(device: torch.device) -> bool:
    """Whether torch.mm(..., out_dtype=float32) exists for half inputs here (torch >= 2.8, CUDA);
    off CUDA the half path is the emulation (float32 matmuls of the half factors)."""
    if torch.device(device).type != "cuda":
        return True
    key = str(device)
    if key not in _HALF_MM:
        try:
            a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
            _HALF_MM[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):
            _HALF_MM[key] = False
    return _HALF_MM[key]
