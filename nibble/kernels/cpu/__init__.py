"""C++ CPU kernels: AQLM Kx8 through lookup tables, AQLM with wider codebooks (1x16) and small
layers through decoding, scalar 4/2-bit through in-register unpacking.

Both take x of any float dtype and leading dimensions, compute in float32 and return x's dtype.
The AQLM kernel reads codes in a blocked layout ``[blocks, out, 8 * M]`` (the code bytes of 8
consecutive input groups contiguous per row), made once per codes tensor and cached
(``nibble.kernels.layout``), like float32 copies of codebooks, scalar scales and zeros.
"""

from __future__ import annotations

import torch

from nibble.kernels.cpu.build import load as load_extension
from nibble.kernels.layout import aqlm_blocked_codes, aqlm_float_codebooks, float_copy

__all__ = ["available", "aqlm_lut_linear", "scalar_linear"]


def available() -> bool:
    """True when the C++ kernels are built and loaded (builds them on first call)."""
    return load_extension()


AQLM_METHODS = {"auto": 0, "lut": 1, "decode": 2}


def aqlm_lut_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None, method: str = "auto") -> torch.Tensor:
    """y = x @ Wᵀ + bias for AQLM weights with 1-4 codebooks, on the CPU.

    ``method``: "lut" (lookup tables; at most 256 codewords), "decode" (per-row decoding; input
    groups of 8; faster for codebooks wider than 8 bits and for layers with fewer than ~320·M
    output rows), or "auto" to choose by that rule.
    """
    books, books_t = aqlm_float_codebooks(codebooks)
    return torch.ops.nibble_cpu.aqlm_lut_linear(x, aqlm_blocked_codes(codes), books, books_t, scales, bias,
                                                codes.shape[1], AQLM_METHODS[method])


def scalar_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ + bias for packed 2- or 4-bit integer weights, on the CPU."""
    return torch.ops.nibble_cpu.scalar_linear(x, packed.contiguous(), float_copy(scales),
                                              None if zeros is None else float_copy(zeros), bits, group_size, bias)
