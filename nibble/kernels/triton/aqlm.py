"""Triton kernel for AQLM at small batch: 1x16 and 2x8 codebooks, input groups of 8.

Each program owns BLOCK_N output rows and walks the input BLOCK_G groups at a time: it loads the
codes of the tile, gathers their codewords (the 2x8 codebooks stay in L1, the 1x16 one in L2),
sums over codebooks, and multiplies with the matching slice of every batch row of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nibble.kernels.layout import cached
from nibble.kernels.triton.common import padded_rows

GROUP = 8
MAX_BATCH = 8
# Tile: output rows × input groups per step. Chosen, not tuned: no GPU was at hand to tune on.
BLOCK_N, BLOCK_G = 16, 32


@triton.jit
def _aqlm_gemv(x_ptr, codes_ptr, books_ptr, scales_ptr, bias_ptr, y_ptr, batch, out_features, num_groups,
               num_codebooks: tl.constexpr, codebook_size: tl.constexpr, BATCH: tl.constexpr,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < out_features
    lanes = tl.arange(0, 8)
    in_features = num_groups * 8
    accs = tl.zeros([BLOCK_N, BATCH], dtype=tl.float32)
    batch_ids = tl.arange(0, BATCH)
    for g0 in range(0, num_groups, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)
        ok = row_ok[:, None] & (groups < num_groups)[None, :]
        weight = tl.zeros([BLOCK_N, BLOCK_G, 8], dtype=tl.float32)
        for m in tl.static_range(num_codebooks):
            code = tl.load(codes_ptr + (rows[:, None] * num_groups + groups[None, :]) * num_codebooks + m,
                           mask=ok, other=0).to(tl.int32)
            if codebook_size > 256:
                code = code & 0xFFFF
            entry = (m * codebook_size + code)[:, :, None] * 8 + lanes[None, None, :]
            weight += tl.load(books_ptr + entry, mask=ok[:, :, None], other=0.0).to(tl.float32)
        columns = groups[:, None] * 8 + lanes[None, :]
        for b in tl.static_range(BATCH):
            xb = tl.load(x_ptr + b * in_features + columns, mask=(groups < num_groups)[:, None],
                         other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(weight * xb[None, :, :], axis=2), axis=1)
            accs += tl.where(batch_ids[None, :] == b, part[:, None], 0.0)
    y = accs * tl.load(scales_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_mask = row_ok[:, None] & (batch_ids < batch)[None, :]
    tl.store(y_ptr + batch_ids[None, :] * out_features + rows[:, None], y, mask=out_mask)


def aqlm_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ + bias for AQLM weights with input groups of 8 and at most 8 rows of x."""
    out_features, num_groups, num_codebooks = codes.shape
    x2, batch, padded = padded_rows(x)
    if batch > MAX_BATCH or codebooks.shape[-1] != GROUP:
        raise ValueError("the Triton AQLM kernel takes groups of 8 and at most 8 rows of x")
    y = torch.empty(batch, out_features, device=x.device, dtype=torch.float32)
    # Codebooks are float16 on disk: keep them so for half-precision inputs (bf16 would round them).
    dtype = torch.float32 if x.dtype == torch.float32 else torch.float16
    books = cached(codebooks, f"triton-{dtype}", lambda t: t.to(dtype).contiguous())
    _aqlm_gemv[(triton.cdiv(out_features, BLOCK_N),)](x2, codes.contiguous(), books, scales.reshape(-1).contiguous(),
                     bias if bias is not None else scales, y, batch, out_features, num_groups,
                     num_codebooks=num_codebooks, codebook_size=codebooks.shape[1],
                     BATCH=padded, HAS_BIAS=bias is not None,
                     BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
