"""Exact packing of b-bit unsigned integers into int32 words.

Along the last dimension, value ``i`` occupies bits ``[i*b, (i+1)*b)`` of a little-endian
bitstream cut into 32-bit words. For b in {1, 2, 4, 8} each word holds 32/b whole values; for
other widths (3, 5, 6, 7) values straddle words, so no bit is wasted. The last dimension must be a
multiple of 32, which makes every row a whole number (b) of words per 32 values.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def packed_width(length: int, bits: int) -> int:
    """Number of int32 words holding ``length`` values of ``bits`` bits."""
    _check(length, bits)
    return length * bits // WORD_BITS


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along the last dim into int32 words."""
    _check(values.shape[-1], bits)
    if values.numel() and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    shifts = torch.arange(bits, device=values.device)
    stream = ((values.to(torch.int64).unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., n*bits]
    stream = stream.unflatten(-1, (-1, WORD_BITS))
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=values.device) << torch.arange(WORD_BITS, device=values.device)
    words = (stream * weights).sum(-1)  # [..., words] in [0, 2**32)
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def unpack_bits(words: torch.Tensor, bits: int, length: int | None = None) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 words → int64 values along the last dim."""
    shifts = torch.arange(WORD_BITS, device=words.device)
    stream = ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 1
    stream = stream.flatten(-2).unflatten(-1, (-1, bits))
    values = (stream << torch.arange(bits, device=words.device)).sum(-1)
    return values if length is None else values[..., :length]


def _check(length: int, bits: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"unsupported bit width {bits}")
    if length % WORD_BITS:
        raise ValueError(f"packed dimension {length} is not a multiple of {WORD_BITS}")
