"""Triton kernel for scalar 4- and 2-bit weights at small batch.

Each program owns BLOCK_N output rows and walks the packed words BLOCK_W at a time (a tile never
straddles a quantization group): it shifts every word into its 32/bits values, applies the
group's scale and zero, and multiplies with the matching slice of every batch row of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nibble.kernels.reference import scalar_zeros
from nibble.kernels.triton.common import padded_rows

MAX_BATCH = 8


@triton.jit
def _scalar_gemv(x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr, batch, out_features, in_features,
                 words_per_row, groups, group_words, BITS: tl.constexpr, BATCH: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < out_features
    shifts = tl.arange(0, PER_WORD) * BITS
    batch_ids = tl.arange(0, BATCH)
    accs = tl.zeros([BLOCK_N, BATCH], dtype=tl.float32)
    words_in = in_features // PER_WORD
    for w0 in range(0, words_in, BLOCK_W):
        words = w0 + tl.arange(0, BLOCK_W)
        group = w0 // group_words
        packed = tl.load(packed_ptr + rows[:, None] * words_per_row + words[None, :], mask=row_ok[:, None], other=0)
        q = ((packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        scale = tl.load(scales_ptr + rows * groups + group, mask=row_ok, other=0.0)
        zero = tl.load(zeros_ptr + rows * groups + group, mask=row_ok, other=0.0)
        weight = (q - zero[:, None, None]) * scale[:, None, None]
        columns = words[:, None] * PER_WORD + tl.arange(0, PER_WORD)[None, :]
        for b in tl.static_range(BATCH):
            xb = tl.load(x_ptr + b * in_features + columns, ).to(tl.float32)
            part = tl.sum(tl.sum(weight * xb[None, :, :], axis=2), axis=1)
            accs += tl.where(batch_ids[None, :] == b, part[:, None], 0.0)
    if HAS_BIAS:
        accs += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_mask = row_ok[:, None] & (batch_ids < batch)[None, :]
    tl.store(y_ptr + batch_ids[None, :] * out_features + rows[:, None], accs, mask=out_mask)


def _words_per_tile(group_words: int, limit: int = 16) -> int:
    """Largest power of two up to ``limit`` dividing the words of one group."""
    tile = 1
    while tile * 2 <= limit and group_words % (tile * 2) == 0:
        tile *= 2
    return tile


def scalar_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ + bias for packed 2- or 4-bit weights and at most 8 rows of x."""
    x2, batch, padded = padded_rows(x)
    in_features = x2.shape[1]
    out_features = packed.shape[0]
    per_word = 32 // bits
    if bits not in (2, 4) or batch > MAX_BATCH or group_size % per_word or in_features % group_size:
        raise ValueError("the Triton scalar kernel takes 2 or 4 bits, whole words per group and <= 8 rows of x")
    group_words = group_size // per_word
    y = torch.empty(batch, out_features, device=x.device, dtype=torch.float32)
    block_n = 32
    _scalar_gemv[(triton.cdiv(out_features, block_n),)](
        x2, packed.contiguous(), scales.float().contiguous(), scalar_zeros(zeros, scales, bits).contiguous(),
        bias if bias is not None else y, y, batch, out_features, in_features, packed.shape[1],
        in_features // group_size, group_words, BITS=bits, BATCH=padded,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_W=_words_per_tile(group_words))
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
