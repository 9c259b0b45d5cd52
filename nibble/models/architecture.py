"""Finding the pieces of a causal LM that the calibration pipeline walks through.

Any model whose decoder blocks sit in one ``nn.ModuleList`` works. Known layouts are looked up by
attribute path; otherwise the longest ModuleList of identical modules is taken.
"""

from __future__ import annotations

import torch
from torch import nn

from nibble.errors import UnsupportedArchitectureError

KNOWN_BLOCK_PATHS = (
    "model.layers",          # Llama, Mistral, Qwen2, Gemma, Phi-3
    "transformer.h",         # GPT-2, GPT-J, Falcon, Bloom
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",       # GPT-NeoX, Pythia
)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of ``model``."""
    for path in KNOWN_BLOCK_PATHS:
        try:
            candidate = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return candidate
    best: nn.ModuleList | None = None
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 1
            and len({type(child) for child in module}) == 1
            and (best is None or len(module) > len(best))
        ):
            best = module
    if best is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no list of decoder blocks (nn.ModuleList) to quantize"
        )
    return best


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules of ``module`` by qualified name, in definition order."""
    return {name: child for name, child in module.named_modules() if isinstance(child, nn.Linear)}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new``."""
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new)


def normalize_linear_layers(model: nn.Module) -> nn.Module:
    """Turn transformers' ``Conv1D`` (GPT-2 style, weight stored [in, out]) into ``nn.Linear``.

    The conversion is exact, so every quantizer only has to know ``nn.Linear``.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(model, name, linear)
    return model
