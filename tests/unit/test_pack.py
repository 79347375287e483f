"""pack_codes / unpack_codes against a naive per-bit Python loop (bit-exact, no tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsq.quant.pack import pack_codes, pack_zeros, packed_width, unpack_codes


def naive_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """One bit at a time: bit b of code i (row r) goes to absolute bit run*32*bits + i*bits + b."""
    rows, cols = codes.shape
    runs = -(-cols // 32)
    words = np.zeros((rows, runs * bits), dtype=np.uint64)
    for r in range(rows):
        for k in range(cols):
            run, i = divmod(k, 32)
            for b in range(bits):
                if (int(codes[r, k]) >> b) & 1:
                    pos = run * 32 * bits + i * bits + b
                    words[r, pos // 32] |= np.uint64(1 << (pos % 32))
    return words.astype(np.uint32).view(np.int32)


def naive_unpack(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    w = words.view(np.uint32)
    out = np.zeros((w.shape[0], cols), dtype=np.uint8)
    for r in range(w.shape[0]):
        for k in range(cols):
            run, i = divmod(k, 32)
            v = 0
            for b in range(bits):
                pos = run * 32 * bits + i * bits + b
                v |= ((int(w[r, pos // 32]) >> (pos % 32)) & 1) << b
            out[r, k] = v
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [32, 40, 72, 100, 128])
def test_pack_matches_naive_bit_loop(bits, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, packed_width(cols, bits))
    np.testing.assert_array_equal(packed.numpy(), naive_pack(codes.numpy(), bits))
    # unpack is checked against the naive unpacker on arbitrary words too (every bit pattern)
    np.testing.assert_array_equal(unpack_codes(packed, bits, cols).numpy(), codes.numpy())
    words = torch.randint(-(2**31), 2**31 - 1, packed.shape, generator=g, dtype=torch.int32)
    np.testing.assert_array_equal(unpack_codes(words, bits, cols).numpy(), naive_unpack(words.numpy(), bits, cols))


def test_known_layouts():
    # 4-bit: 8 nibbles per word, low nibble first
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] + [0] * 24], dtype=torch.uint8)
    assert pack_codes(codes, 4)[0, 0].item() & 0xFFFFFFFF == 0x87654321
    # 3-bit: code 10 = 0b111 straddles: bits 30,31 of word 0 and bit 0 of word 1
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 7
    p = pack_codes(codes, 3)[0].tolist()
    assert p == [-(2**31) + 2**30, 1, 0]


def test_all_ones_and_extremes_round_trip():
    for bits in (2, 3, 4, 8):
        codes = torch.full((3, 96), (1 << bits) - 1, dtype=torch.uint8)
        assert (pack_codes(codes, bits) == -1).all()  # every bit set
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 96), codes)


def test_accepts_float_and_int64_codes():
    codes = torch.randint(0, 8, (4, 40))
    assert torch.equal(pack_codes(codes.float(), 3), pack_codes(codes.to(torch.uint8), 3))


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.full((2, 32), 16), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(2, 32, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="in_features"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), 3, 64)
    with pytest.raises(ValueError, match="integers"):
        pack_zeros(torch.tensor([[1.5]]), 4)
    assert pack_zeros(torch.tensor([[8.0, 0.0]]), 4).dtype == torch.uint8
