"""Storage formats of quantized weights: one module class per format, a registry, checkpoints."""

from nibble.formats.base import FORMATS, QuantizedLinear, register_format
from nibble.formats.scalar import ScalarQuantLinear
from nibble.formats.aqlm import AQLMLinear

__all__ = ["FORMATS", "QuantizedLinear", "register_format", "ScalarQuantLinear", "AQLMLinear"]
