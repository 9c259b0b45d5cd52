"""GPTQ (Frantar et al., 2023): column-by-column rounding with Hessian-based error feedback.

Each column is rounded to its group's grid; the rounding error, weighted by the inverse Hessian's
Cholesky factor, is pushed onto the columns not yet quantized. Updates are applied lazily in blocks
of ``block_size`` columns. With ``act_order`` columns are visited by decreasing Hessian diagonal,
and group grids are fitted up front on the original weights so groups stay contiguous on disk.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nibble.errors import ConfigError, NonFiniteError
from nibble.formats.scalar import ScalarQuantLinear
from nibble.quantize.base import register_method
from nibble.quantize.grid import dequantize_grid, fit_grid, quantize_to_grid
from nibble.quantize.rtn import RTNConfig, RTNQuantizer, grid_per_group


@dataclasses.dataclass(frozen=True)
class GPTQConfig(RTNConfig):
    """GPTQ settings on top of the integer grid: damping (fraction of mean diag H), order, block."""

    method = "gptq"
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise ConfigError(f"gptq: damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"gptq: block size must be positive, got {self.block_size}")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H), in float32."""
    h = hessian.double().clone()
    idx = torch.arange(h.shape[0])
    h[idx, idx] += damp * h.diagonal().mean()
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True).float()
    except torch.linalg.LinAlgError:
        raise NonFiniteError("gptq: Hessian is not positive definite even after damping") from None


@register_method(GPTQConfig)
class GPTQQuantizer(RTNQuantizer):
    """Hessian-aware rounding; falls back to nothing: an unusable H raises ``NonFiniteError``."""

    needs_hessian = True

    def quantize_layer(self, name: str, linear: nn.Linear, hessian: torch.Tensor | None) -> ScalarQuantLinear:
        cfg = self.config
        weight = linear.weight.detach().float().clone()
        columns = weight.shape[1]
        group_size = cfg.layer_group_size(columns)
        hessian = hessian.clone()
        dead = hessian.diagonal() == 0
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0

        order = torch.argsort(hessian.diagonal(), descending=True) if cfg.act_order else torch.arange(columns)
        static = grid_per_group(weight, cfg.bits, group_size, cfg.symmetric) if cfg.act_order else None
        scales = torch.zeros(weight.shape[0], -(-columns // group_size))
        zeros = torch.zeros_like(scales)

        w = weight[:, order]
        factor = inverse_hessian_factor(hessian[order][:, order], cfg.damp)
        q = torch.zeros_like(w, dtype=torch.int64)
        for start in range(0, columns, cfg.block_size):
            end = min(start + cfg.block_size, columns)
            block = w[:, start:end].clone()
            errors = torch.zeros_like(block)
            for i in range(end - start):
                column = start + i
                group = int(order[column]) // group_size
                if static is not None:
                    scales[:, group], zeros[:, group] = static[0][:, group], static[1][:, group]
                elif column % group_size == 0:
                    group_weights = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :group_size]
                    scales[:, group], zeros[:, group] = fit_grid(group_weights, cfg.bits, cfg.symmetric)
                codes = quantize_to_grid(block[:, i : i + 1], scales[:, group], zeros[:, group], cfg.bits)
                q[:, column] = codes[:, 0]
                error = (block[:, i] - dequantize_grid(codes, scales[:, group], zeros[:, group])[:, 0])
                error = error / factor[column, column]
                block[:, i:] -= error[:, None] * factor[column, column:end][None, :]
                errors[:, i] = error
            w[:, end:] -= errors @ factor[start:end, end:]
        codes = torch.empty_like(q)
        codes[:, order] = q
        return ScalarQuantLinear.from_integers(codes, scales, zeros, cfg.bits, group_size, cfg.symmetric,
                                               linear.bias)
