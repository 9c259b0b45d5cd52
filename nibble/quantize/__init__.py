"""Quantization methods: one config and one algorithm file per method, one ``quantize_`` entry."""

from nibble.quantize.base import METHODS, LayerQuantizer, QuantConfig, config_from_dict, register_method
from nibble.quantize.rtn import RTNConfig
from nibble.quantize.gptq import GPTQConfig
from nibble.quantize.aqlm import AQLMConfig
from nibble.quantize.api import CalibrationConfig, quantize_, quantize_to_dir

__all__ = [
    "METHODS", "LayerQuantizer", "QuantConfig", "config_from_dict", "register_method",
    "RTNConfig", "GPTQConfig", "AQLMConfig", "CalibrationConfig", "quantize_", "quantize_to_dir",
]
