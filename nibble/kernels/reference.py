"""Reference kernels: decode the dense weight, then one matmul. Exact up to matmul rounding,
differentiable (gradients reach x, codebooks and scales), any device, config and batch.

They compute in float32 on the CPU and in ``x.dtype`` on accelerators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nibble.formats.aqlm import dequantize_additive
from nibble.formats.packing import unpack_bits


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "cpu" else x.dtype


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dtype = _compute_dtype(x)
    y = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return y.to(x.dtype)


def aqlm_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ + bias with W = dequantize_additive(codes, codebooks, scales)."""
    return _linear(x, dequantize_additive(codes, codebooks, scales.reshape(-1)), bias)


def scalar_zeros(zeros: torch.Tensor | None, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points as floats; a symmetric grid (``zeros is None``) has the midpoint 2^(bits−1)."""
    if zeros is None:
        return torch.full(scales.shape, float(2 ** (bits - 1)), device=scales.device)
    return zeros.float()


def unpack_rows(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Integers [out, length] (int32) from rows of little-endian b-bit values in int32 words."""
    if 32 % bits:
        return unpack_bits(packed, bits, length).to(torch.int32)
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[..., :length]


def expand_groups(per_group: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """Per-group values [out, n_groups] repeated over their columns: [out, length] (the last group
    may be shorter than ``group_size``)."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :length]


def scalar_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, in_features: int) -> torch.Tensor:
    """Dense weight [out, in] (float32): w = s·(q − z) per group of ``group_size`` columns."""
    q = unpack_rows(packed, bits, in_features).float()
    scale = expand_groups(scales.float(), group_size, in_features)
    return scale * (q - expand_groups(scalar_zeros(zeros, scales, bits), group_size, in_features))


def scalar_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ + bias for packed b-bit integer weights."""
    return _linear(x, scalar_dequantize(packed, scales, zeros, bits, group_size, x.shape[-1]), bias)
