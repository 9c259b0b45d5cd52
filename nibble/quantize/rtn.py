"""Round-to-nearest: each group of weights onto its own min/max integer grid. Needs no data."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nibble.errors import ConfigError
from nibble.formats.scalar import ScalarQuantLinear
from nibble.kernels.reference import expand_groups
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
        """The group size for a layer (at most its width; a last group may be shorter)."""
        return in_features if self.group_size == -1 else min(self.group_size, in_features)


def grid_per_group(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """(scales, zeros) [out, n_groups] fitted independently to each group of ``weight``."""
    padding = -weight.shape[1] % group_size  # zeros do not move a grid that always spans 0
    groups = F.pad(weight, (0, padding)).unflatten(1, (-1, group_size))  # [out, n_groups, g]
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
        flat_scale = expand_groups(scales, group_size, weight.shape[1]).flatten()
        flat_zero = expand_groups(zeros, group_size, weight.shape[1]).flatten()
        q = quantize_to_grid(weight.flatten()[:, None], flat_scale, flat_zero, cfg.bits).view_as(weight)
        return ScalarQuantLinear.from_integers(q, scales, zeros, cfg.bits, group_size, cfg.symmetric,
                                               linear.bias)
