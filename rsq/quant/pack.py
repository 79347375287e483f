"""Dense bit packing of integer codes into int32 words, and the small per-group tensors.

Layout (fixed; checkpoints and kernels depend on it): codes are packed along the input dim of each
row. Every run of 32 consecutive codes of a row occupies exactly ``bits`` int32 words; code i of the
run occupies bit positions [i*bits, (i+1)*bits) of the little-endian 32*bits-bit string made of
those words (word 0 holds bits 0..31). ``in_features`` is padded up to a multiple of 32 with zero
codes. Examples:

* 4 bits: word j of a row holds codes 8j..8j+7, low nibble first (the usual int4 layout).
* 3 bits: a run of 32 codes is 96 bits in 3 words; code 10 straddles words 0 and 1 (bits 30..32)
  and code 21 straddles words 1 and 2 (bits 63..65).
* 2 / 8 bits: 16 / 4 codes per word, lowest bits first.

Shapes: codes (out, in) -> packed (out, ceil(in / 32) * bits) int32. Scales are stored as the model
dtype (out, n_groups); zero points as uint8 (out, n_groups), also for symmetric grids (2^(bits-1)).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
RUN = 32  # codes per run; a run is exactly `bits` int32 words
_ROW_CHUNK = 2048  # rows packed at a time, bounding the int64 scratch to ~chunk * in * 16 bytes


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"packing supports bits in {SUPPORTED_BITS}, got {bits}: choose one of those")


def packed_width(in_features: int, bits: int) -> int:
    """Number of int32 words per row: ceil(in_features / 32) * bits."""
    check_bits(bits)
    return -(-in_features // RUN) * bits


def _slots(bits: int):
    """For code i of a run: (word index, shift, bits spilling into the next word)."""
    for i in range(RUN):
        word, shift = divmod(i * bits, 32)
        yield i, word, shift, max(0, shift + bits - 32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bit pattern as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (out, in) in [0, 2^bits - 1] into int32 (out, ceil(in/32) * bits).

    Any integer dtype is accepted (uint8 from the solvers, int64, ...); float tensors holding
    integral values (what quantize_codes returns) are accepted too. Raises ValueError for codes out
    of range or non-integral values.
    """
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects codes of shape (out, in), got {tuple(codes.shape)}")
    if codes.is_floating_point():
        if not torch.equal(codes, codes.round()):
            raise ValueError("pack_codes got non-integral codes: round them (quantize_codes) first")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise ValueError(
            f"codes span [{int(c.min())}, {int(c.max())}], outside [0, {(1 << bits) - 1}] for {bits} bits: "
            "pass unsigned codes of the same bit width"
        )
    rows, cols = c.shape
    runs = -(-cols // RUN)
    out = torch.empty(rows, runs * bits, dtype=torch.int32, device=codes.device)
    for r0 in range(0, rows, _ROW_CHUNK):
        chunk = c[r0 : r0 + _ROW_CHUNK]
        padded = torch.nn.functional.pad(chunk, (0, runs * RUN - cols)).reshape(-1, runs, RUN)
        words = torch.zeros(padded.shape[0], runs, bits, dtype=torch.int64, device=codes.device)
        for i, word, shift, spill in _slots(bits):
            code = padded[:, :, i]
            words[:, :, word] |= (code << shift) & 0xFFFFFFFF
            if spill:
                words[:, :, word + 1] |= code >> (bits - spill)
        out[r0 : r0 + _ROW_CHUNK] = _to_int32(words).reshape(-1, runs * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 (out, ceil(in/32) * bits) -> uint8 codes (out, in)."""
    check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_codes expects an int32 (out, words) tensor, got {packed.dtype} {tuple(packed.shape)}")
    width = packed_width(in_features, bits)
    if packed.shape[1] != width:
        raise ValueError(
            f"packed rows have {packed.shape[1]} words, but in_features={in_features} at {bits} bits needs {width}: "
            "check in_features and bits against the checkpoint's config"
        )
    rows = packed.shape[0]
    runs = width // bits
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(rows, runs, bits)
    mask = (1 << bits) - 1
    codes = torch.empty(rows, runs, RUN, dtype=torch.uint8, device=packed.device)
    for i, word, shift, spill in _slots(bits):
        value = words[:, :, word] >> shift
        if spill:
            value = value | (words[:, :, word + 1] << (bits - spill))
        codes[:, :, i] = (value & mask).to(torch.uint8)
    return codes.reshape(rows, runs * RUN)[:, :in_features]


def pack_zeros(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points (out, n_groups), integral floats or ints in [0, 2^bits - 1] -> uint8."""
    check_bits(bits)
    z = zero.detach()
    if z.is_floating_point() and not torch.equal(z, z.round()):
        raise ValueError("zero points must be integers (grid.find_params returns integral zeros)")
    if z.numel() and (float(z.min()) < 0 or float(z.max()) > (1 << bits) - 1):
        raise ValueError(f"zero points span [{float(z.min())}, {float(z.max())}], outside [0, {(1 << bits) - 1}]")
    return z.to(torch.uint8)


def pack_scales(scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Scales (out, n_groups) -> ``dtype`` (the model's compute dtype). Raises on non-finite scales."""
    s = scale.detach().to(dtype)
    if not torch.isfinite(s).all():
        raise ValueError(f"scales are not finite in {dtype}: the weights overflow this dtype; store float32")
    return s
