"""Uniform integer grids shared by RTN and GPTQ: w ≈ scale · (q − zero), q ∈ [0, 2^bits − 1]."""

from __future__ import annotations

import torch


def fit_grid(weight: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for ``weight`` [rows, cols], from the row's range.

    Asymmetric grids span [min, max] (with 0 included) and round the zero point to an integer;
    symmetric grids span [-max|w|, max|w|] around the fixed midpoint 2^(bits−1). Scales are rounded
    to float16 so that what is stored is exactly what is used.
    """
    levels = 2**bits - 1
    low = weight.min(dim=1).values.clamp(max=0)
    high = weight.max(dim=1).values.clamp(min=0)
    if symmetric:
        bound = torch.maximum(-low, high)
        scale = 2 * bound / levels
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = (high - low) / levels
        zero = torch.zeros_like(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half().float()
    if not symmetric:
        zero = torch.round(-low / scale).clamp(0, levels)
    return scale, zero


def quantize_to_grid(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid integers (int64) for ``weight`` [rows, cols] given per-row ``scale``/``zero`` [rows]."""
    return torch.clamp(torch.round(weight / scale[:, None]) + zero[:, None], 0, 2**bits - 1).to(torch.int64)


def dequantize_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Grid integers back to floats: scale · (q − zero), broadcasting per row."""
    return scale[:, None] * (q.to(scale.dtype) - zero[:, None])
