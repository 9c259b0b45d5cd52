"""Pure-torch lookup-table kernel for AQLM with small codebooks: the fallback of the C++ one.

Tables of <x_group, codeword> come from one einsum; each output is the sum of the entries its
codes pick, gathered a slab of rows at a time to bound memory. Slower than the C++ kernel, but
it reads 2^B·g times fewer weight values than decoding does.
"""

from __future__ import annotations

import torch

from nibble.formats.aqlm import codes_to_index

ROWS_PER_SLAB = 512


def aqlm_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ + bias, computed in float32 from lookup tables."""
    out_features, num_groups, num_codebooks = codes.shape
    size, group_size = codebooks.shape[1], codebooks.shape[2]
    xs = x.reshape(-1, num_groups, group_size).float()
    tables = torch.einsum("bjk,mck->bjmc", xs, codebooks.float()).reshape(xs.shape[0], -1)
    offsets = torch.arange(num_groups * num_codebooks, device=x.device).view(num_groups, num_codebooks) * size
    y = torch.empty(xs.shape[0], out_features, device=x.device)
    for start in range(0, out_features, ROWS_PER_SLAB):
        index = (codes_to_index(codes[start:start + ROWS_PER_SLAB]) + offsets).flatten(1)
        y[:, start:start + index.shape[0]] = tables[:, index].sum(-1)
    y = y * scales.reshape(-1).float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)
