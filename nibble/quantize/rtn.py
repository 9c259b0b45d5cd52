"""Round-to-nearest: each group of weights onto its own min/max integer grid. Needs no data."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nibble.errors import ConfigError
from nibble.formats.scalar import ScalarQuantLinear
from nibble.quantize.base import LayerQuantizer, QuantConfig, register_method
from nibble.quantize.grid import fit_grid, quantize_to_grid

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """b-bit integer weights per group of ``group_size`` inputs (-1: one group per output row)."""

    method = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"{self.method}: bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"{self.method}: group size must be positive or -1, got {self.group_size}")

    def layer_group_size(self, in_features: int) -> int:
        """The group size for a layer; raises ``ConfigError`` when it does not divide the layer."""
        size = in_features if self.group_size == -1 else self.group_size
        if in_features % size:
            raise ConfigError(f"{self.method}: group size {size} does not divide layer width {in_features}")
        return size


def grid_per_group(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """(scales, zeros) [out, n_groups] fitted independently to each group of ``weight``."""
    groups = weight.unflatten(1, (-1, group_size))  # [out, n_groups, g]
    scale, zero = fit_grid(groups.flatten(0, 1), bits, symmetric)
    return scale.view(groups.shape[:2]), zero.view(groups.shape[:2])


@register_method(RTNConfig)
class RTNQuantizer(LayerQuantizer):
    """Round each weight to the nearest point of its group's grid."""

    needs_hessian = False

    def quantize_layer(self, name: str, linear: nn.Linear, hessian: torch.Tensor | None) -> ScalarQuantLinear:
        cfg = self.config
        weight = linear.weight.detach().float()
        group_size = cfg.layer_group_size(weight.shape[1])
        scales, zeros = grid_per_group(weight, cfg.bits, group_size, cfg.symmetric)
        flat_scale = scales.repeat_interleave(group_size, dim=1).flatten()
        flat_zero = zeros.repeat_interleave(group_size, dim=1).flatten()
        q = quantize_to_grid(weight.flatten()[:, None], flat_scale, flat_zero, cfg.bits).view_as(weight)
        return ScalarQuantLinear.from_integers(q, scales, zeros, cfg.bits, group_size, cfg.symmetric,
                                               linear.bias)
