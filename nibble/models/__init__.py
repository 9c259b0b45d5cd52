"""Model loading and the architecture adapter (where the decoder blocks and linear layers are)."""

from nibble.models.architecture import (
    decoder_blocks,
    linear_layers,
    normalize_linear_layers,
    set_submodule,
)
from nibble.models.loading import load_model, load_tokenizer, resolve_spec

__all__ = [
    "decoder_blocks",
    "linear_layers",
    "normalize_linear_layers",
    "set_submodule",
    "load_model",
    "load_tokenizer",
    "resolve_spec",
]
