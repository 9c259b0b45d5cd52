"""Triton GPU kernels (AQLM 1x16 and 2x8, scalar 4/2-bit) for small batches.

Nothing here imports triton until a kernel runs on a CUDA device.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    """True when CUDA is present and triton imports."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def aqlm_linear(x, codes, codebooks, scales, bias=None):
    from nibble.kernels.triton.aqlm import aqlm_linear as run
    return run(x, codes, codebooks, scales, bias)


def scalar_linear(x, packed, scales, zeros, bits, group_size, bias=None):
    from nibble.kernels.triton.scalar import scalar_linear as run
    return run(x, packed, scales, zeros, bits, group_size, bias)
