"""Honest size accounting: every stored bit of quantized layers, and of the whole model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from nibble.formats.base import QuantizedLinear


@dataclass
class SizeReport:
    quantized_weights: int       # weight entries held by quantized layers
    quantized_bits: int          # all their storage bits: codes, codebooks, scales, zeros
    other_parameters: int        # everything else (embeddings, norms, head, biases)
    other_bits: int
    parts: dict[str, int]        # quantized bits by part

    @property
    def bits_per_weight(self) -> float:
        """Average bits per weight of the quantized layers, everything counted."""
        return self.quantized_bits / max(self.quantized_weights, 1)

    @property
    def bits_per_parameter(self) -> float:
        """Average bits over every parameter of the model."""
        return (self.quantized_bits + self.other_bits) / max(self.quantized_weights + self.other_parameters, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight,
                "bits_per_parameter": self.bits_per_parameter}


def size_report(model: nn.Module, other_bits_per_parameter: int = 16) -> SizeReport:
    """Count storage bits; non-quantized parameters at ``other_bits_per_parameter`` (tied ones once)."""
    quantized_weights = quantized_bits = 0
    parts: dict[str, int] = {}
    quantized_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            quantized_weights += module.in_features * module.out_features
            for part, bits in module.storage_bits().items():
                parts[part] = parts.get(part, 0) + bits
                quantized_bits += bits
            quantized_params.update(id(p) for p in module.parameters(recurse=False) if p is not module.bias)
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantized_params)
    return SizeReport(quantized_weights, quantized_bits, other, other * other_bits_per_parameter, parts)
