"""The contract every quantized linear layer keeps, and the registry of formats.

A format owns its tensors (registered as parameters or buffers so that ``state_dict`` and
safetensors see them), knows how to decode them into a dense weight, how many bits they cost, and
how to re-encode a dense weight onto representable values (the projection PV-Tuning needs).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

FORMATS: dict[str, type["QuantizedLinear"]] = {}
#: calls with at most this many input rows (decode steps, small batches) go to the fast kernels of
#: ``nibble.kernels``; larger ones (prefill, evaluation, training) decode the weight and use a matmul
KERNEL_MAX_ROWS = 8


def register_format(cls: type["QuantizedLinear"]) -> type["QuantizedLinear"]:
    """Class decorator: make a format loadable by its ``format_name``."""
    FORMATS[cls.format_name] = cls
    return cls


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored compressed. Subclasses set ``format_name``."""

    format_name: ClassVar[str]
    #: ``project_`` takes ``hessian=`` (re-encodes in trace(ΔW H ΔWᵀ) rather than squared error)
    projects_under_hessian: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # --- what a format must provide -------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """The dense weight [out_features, in_features] this layer represents (float32)."""
        raise NotImplementedError

    def format_config(self) -> dict[str, Any]:
        """JSON-able description from which ``empty`` rebuilds a module of the same shapes."""
        raise NotImplementedError

    @classmethod
    def empty(cls, config: dict[str, Any]) -> "QuantizedLinear":
        """An uninitialised module matching ``config``, ready for ``load_state_dict``."""
        raise NotImplementedError

    def storage_bits(self) -> dict[str, int]:
        """Bits this layer's weight costs on disk, by part (codes, codebooks, scales, ...)."""
        raise NotImplementedError

    def project_(self, weight: torch.Tensor, groups: torch.Tensor | None = None, *,
                 column_weights: torch.Tensor | None = None) -> None:
        """Re-encode ``weight`` onto representable values, only in the selected ``groups`` if given.

        ``groups`` is a boolean mask over the format's weight groups (``group_shape``).
        ``column_weights`` [in] (positive): fit in the error weighted per input column,
        Σ_j c_j (W − Ŵ)²_{·j} (e.g. the inputs' second moments), instead of plain squared error.
        """
        raise NotImplementedError

    @property
    def group_shape(self) -> tuple[int, int]:
        """(rows, columns) of the grid of weight groups that ``project_`` masks address."""
        raise NotImplementedError

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x Wᵀ + b by a compressed-weight kernel; formats without one use the dense path."""
        return self.dense_forward(x)

    # --- shared behaviour -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if rows <= KERNEL_MAX_ROWS and not training:
            return self.kernel_forward(x)
        return self.dense_forward(x)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the weight, then one matmul (differentiable in the continuous parameters)."""
        weight = self.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def bits_per_weight(self) -> float:
        """All storage bits of the weight (codes, codebooks, scales, zeros) per weight entry."""
        return sum(self.storage_bits().values()) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.format_name}, {self.bits_per_weight():.3f} bpw"
