"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import torch
import triton


def padded_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """x as [rows, in], zero-padded to a power-of-two number of rows; also (rows, padded rows)."""
    x2 = x.reshape(-1, x.shape[-1])
    batch = x2.shape[0]
    padded = max(1, triton.next_power_of_2(batch))
    if padded != batch:
        x2 = torch.cat([x2, x2.new_zeros(padded - batch, x2.shape[1])])
    return x2.contiguous(), batch, padded
