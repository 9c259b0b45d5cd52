"""Scalar (RTN/GPTQ-style) integer format: packed b-bit codes with per-group scales and zeros.

Tensors of one layer (``n_groups = ceil(in_features / group_size)``; when ``group_size`` does not
divide ``in_features`` the last group is shorter):

- ``qweight`` int32 [out, padded_in * bits / 32]: codes packed by ``formats.packing``
  (the input dimension zero-padded up to a multiple of 32);
- ``scales``  [out, n_groups], stored float16;
- ``zeros``   uint8 [out, n_groups], the integer zero points (asymmetric grids only; a symmetric
  grid's zero is the fixed midpoint 2^(bits−1) and is not stored).

``W[o, i] = scales[o, i // group_size] · (q[o, i] − zeros[o, i // group_size])``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nibble.formats.base import QuantizedLinear, register_format
from nibble.formats.packing import WORD_BITS, pack_bits, unpack_bits


def padded_length(length: int) -> int:
    return -(-length // WORD_BITS) * WORD_BITS


@register_format
class ScalarQuantLinear(QuantizedLinear):
    """Linear layer with b-bit integer weights in groups of ``group_size`` input columns."""

    format_name = "scalar"
    storage_dtypes = {"scales": torch.float16}

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 symmetric: bool, bias: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias)
        if group_size <= 0:
            group_size = in_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = -(-in_features // group_size)  # the last group may be shorter
        words = padded_length(in_features) * bits // WORD_BITS
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
        self.scales = nn.Parameter(torch.ones(out_features, n_groups), requires_grad=False)
        if symmetric:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))

    @classmethod
    def from_integers(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int, symmetric: bool, bias: torch.Tensor | None) -> "ScalarQuantLinear":
        """Build from integer codes [out, in] and per-group scales/zeros [out, n_groups]."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bits, group_size, symmetric, bias)
        layer.set_integers(q)
        layer.scales.data.copy_(scales.half().float())
        if layer.zeros is not None:
            layer.zeros.copy_(zeros.to(torch.uint8))
        return layer

    # --- codes --------------------------------------------------------------------------------
    def integers(self) -> torch.Tensor:
        """Integer codes [out, in] (int64)."""
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def set_integers(self, q: torch.Tensor) -> None:
        padded = torch.zeros(self.out_features, padded_length(self.in_features), dtype=torch.int64, device=q.device)
        padded[:, : self.in_features] = q
        self.qweight.copy_(pack_bits(padded, self.bits))

    def zero_points(self) -> torch.Tensor:
        """Zero points [out, n_groups] as floats (the fixed midpoint for symmetric grids)."""
        from nibble.kernels.reference import scalar_zeros

        return scalar_zeros(self.zeros, self.scales, self.bits)

    # --- QuantizedLinear contract --------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        from nibble.kernels.reference import scalar_dequantize

        return scalar_dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from nibble.kernels import scalar_linear

        return scalar_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.bias)

    def runtime_ckernel(self):
        """C entry points for the runtime's C++ decode step: 8- and 4-bit weights (None otherwise)."""
        from nibble.kernels.cpu.ckernel import scalar_ckernel

        return scalar_ckernel(self.qweight, self.scales, self.zero_points(), self.in_features, self.group_size,
                              self.bits, self.bias)

    def runtime_linear(self):
        """``x -> y`` for the runtime's torch step: 8- and 4-bit weights on the CPU through the C
        entry points (no dense copy of the weight per call); otherwise ``forward``."""
        kernel = self.runtime_ckernel() if self.qweight.device.type == "cpu" else None
        if kernel is None:
            return self.forward
        from nibble.kernels.cpu.ckernel import ckernel_callable

        return ckernel_callable(kernel, self.out_features)

    def format_config(self) -> dict[str, Any]:
        return {"format": self.format_name, "in_features": self.in_features,
                "out_features": self.out_features, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "bias": self.bias is not None}

    @classmethod
    def empty(cls, config: dict[str, Any]) -> "ScalarQuantLinear":
        bias = torch.zeros(config["out_features"]) if config["bias"] else None
        return cls(config["in_features"], config["out_features"], config["bits"],
                   config["group_size"], config["symmetric"], bias)

    def storage_bits(self) -> dict[str, int]:
        bits = {"codes": self.out_features * padded_length(self.in_features) * self.bits,
                "scales": self.scales.numel() * 16}
        if self.zeros is not None:
            bits["zeros"] = self.zeros.numel() * 8
        return bits

    @property
    def group_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def project_(self, weight: torch.Tensor, groups: torch.Tensor | None = None, *,
                 column_weights: torch.Tensor | None = None) -> None:
        """Round ``weight`` to this layer's grid (scales and zeros fixed), only where ``groups``.

        Each weight rounds on its own, so per-column weights of the error change nothing."""
        from nibble.kernels.reference import expand_groups

        group_scale = expand_groups(self.scales.float(), self.group_size, self.in_features)
        group_zero = expand_groups(self.zero_points(), self.group_size, self.in_features)
        rounded = torch.clamp(torch.round(weight.float() / group_scale + group_zero), 0, 2**self.bits - 1).to(torch.int64)
        current = self.integers()
        self.set_integers(rounded if groups is None else torch.where(groups, rounded, current))
