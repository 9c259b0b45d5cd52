"""nibble: make large neural networks small — AQLM, GPTQ, PV-Tuning, 4-bit training, fast inference."""

from nibble.models import load_model, load_tokenizer
from nibble.quantize import quantize_

__version__ = "0.1.0"
__all__ = ["load_model", "load_tokenizer", "quantize_", "__version__"]
