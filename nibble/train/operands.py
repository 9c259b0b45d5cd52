"""Named operand quantizers and the per-call plan that says how each GEMM operand is quantized.

A quantized layer computes three GEMMs per training step:

* forward        ``Y  = X · Wᵀ``   (reduction over input features)
* input gradient ``dX = dY · W``   (reduction over output features)
* weight gradient ``dW = dYᵀ · X`` (reduction over the rows: batch × positions)

Each of the six operands gets a quantizer ``q(tensor, dim) -> tensor`` where ``dim`` is the GEMM's
reduction dimension (used by block formats, ignored by per-tensor ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nibble.errors import ConfigError
from nibble.train.formats import RADIX4_EVEN, RADIX4_ODD, quantize_mxfp4, quantize_nvfp4
from nibble.train.quantizers import (LOG_FORMATS, interleaved_two_phase_round, quantize_activation_pact,
                                    quantize_grad_log, quantize_weight_sawb)

Quantizer = Callable[[torch.Tensor, int], torch.Tensor]

FORWARD = "forward"  # in a backward GEMM: reuse the operand as the forward GEMM quantized it
PACT = "int4-pact"
PACT_BITS = 4  # the int4-pact operand


def _identity(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t


def _static_quantizers() -> dict[str, Quantizer]:
    table: dict[str, Quantizer] = {
        "fp32": _identity,
        "int4-sawb": lambda t, dim: quantize_weight_sawb(t, 4),
        "mxfp4": lambda t, dim: quantize_mxfp4(t, dim),
        "mxfp4-sr": lambda t, dim: quantize_mxfp4(t, dim, "stochastic", clip_free=True),
        "nvfp4": lambda t, dim: quantize_nvfp4(t, dim),
        "nvfp4-sr": lambda t, dim: quantize_nvfp4(t, dim, "stochastic"),
    }
    for name, fmt in LOG_FORMATS.items():
        table[name] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt)
        table[f"{name}-sr"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, "stochastic")
        # nearest in the log domain (geometric midpoints), an ablation of linear-domain nearest
        table[f"{name}-geo"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, "nearest-log")
        # one GradScale per output vector of the GEMM (per row of dY in the input-gradient GEMM,
        # per column in the weight-gradient GEMM): scales outside the reduction, as hardware needs
        table[f"{name}-vec"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, dim=dim)
        table[f"{name}-sr-vec"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, "stochastic", dim=dim)
        # microscaled: one GradScale per 32 values along the GEMM's reduction
        table[f"{name}-b32"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, dim=dim, block=32)
        table[f"{name}-sr-b32"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, "stochastic", dim=dim, block=32)
        # a random shift of the GradScale by up to one grid period (one draw per tensor)
        table[f"{name}-dither"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, dither=True)
        table[f"{name}-dither-b32"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, dim=dim, block=32, dither=True)
        # the same, divided by the dither's expected gain (an unbiased scale)
        table[f"{name}-udither-b32"] = lambda t, dim, fmt=fmt: quantize_grad_log(t, fmt, dim=dim, block=32, dither=True,
                                                                                debias=True)
    # radix-4 phases alternating along the GEMM's reduction (starting even / odd)
    for start, fmt in (("even", RADIX4_EVEN), ("odd", RADIX4_ODD)):
        table[f"log4-{start}-alt"] = lambda t, dim, fmt=fmt: interleaved_two_phase_round(t, dim, fmt)
    return table


STATIC_OPERANDS = _static_quantizers()
OPERAND_NAMES = (*STATIC_OPERANDS, PACT)


def operand_quantizer(name: str, alpha: torch.Tensor | None = None, signed: bool = False) -> Quantizer:
    """The quantizer called ``name``; ``int4-pact`` needs the layer's clip ``alpha``."""
    if name == PACT:
        if alpha is None:
            raise ConfigError("the int4-pact operand needs a clip value alpha")
        return lambda t, dim: quantize_activation_pact(t, alpha, PACT_BITS, signed)
    if name not in STATIC_OPERANDS:
        raise ConfigError(f"unknown operand format {name!r}: use one of {', '.join(OPERAND_NAMES)}")
    return STATIC_OPERANDS[name]


@dataclass(frozen=True)
class GemmPlan:
    """The six operand quantizers of one layer call; ``None`` in a backward slot reuses the forward's."""

    x: Quantizer = _identity
    w: Quantizer = _identity
    dgrad_g: Quantizer = _identity
    dgrad_w: Quantizer | None = None
    wgrad_g: Quantizer = _identity
    wgrad_x: Quantizer | None = None
    hadamard: int = 0  # block of the random Hadamard transform on the weight-gradient GEMM (0: none)
