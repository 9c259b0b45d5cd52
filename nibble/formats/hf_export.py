"""Export AQLM-quantized models to the transformers + ``aqlm`` layout, and import them back.

The layout (what ``transformers`` builds when ``config.json`` holds ``quantization_config`` with
``quant_method: "aqlm"`` and the PyPI package ``aqlm`` is installed): every quantized ``nn.Linear``
becomes ``aqlm.QuantizedLinear`` with

- ``codes``     [out / out_group_size, in / in_group_size, num_codebooks], int8 for 8-bit codebooks,
                 int16 up to 16 bits (the unsigned code's bit pattern, ``aqlm.utils.pack_int_data``);
- ``codebooks`` [num_codebooks, 2**nbits, out_group_size, in_group_size];
- ``scales``    [out / out_group_size, 1, 1, 1];
- ``bias``      [out] if the layer has one.

nibble always uses ``out_group_size = 1``. Codebooks and scales are written float16 (the values
nibble evaluates are float16-representable, so nothing is lost); other weights keep their dtype.
``import_hf`` reads such a folder back into a model with nibble ``AQLMLinear`` layers, bit-exactly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble.errors import CheckpointError
from nibble.formats.aqlm import STORAGE_DTYPE, AQLMLinear, codes_to_index, index_to_codes
from nibble.formats.base import QuantizedLinear

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------

def pack_codes(index: torch.Tensor, nbits: int) -> torch.Tensor:
    """Non-negative code indices in aqlm's storage: int8/int16 holding the low ``nbits`` bits, signed."""
    index = index.to(torch.int64)
    packed = torch.where(index >= 2 ** (nbits - 1), index - 2**nbits, index)
    return packed.to(torch.int8 if nbits <= 8 else torch.int16)


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """aqlm-stored codes back to non-negative int64 indices."""
    return codes.to(torch.int64) % (2**nbits)


def layer_to_aqlm(layer: AQLMLinear) -> dict[str, torch.Tensor]:
    """The tensors of ``aqlm.QuantizedLinear`` that represent ``layer`` (out_group_size 1)."""
    tensors = {
        "codes": pack_codes(codes_to_index(layer.codes), layer.nbits_per_codebook).contiguous(),
        "codebooks": layer.codebooks.detach().to(STORAGE_DTYPE)[:, :, None, :].contiguous(),
        "scales": layer.scales.detach().to(STORAGE_DTYPE).reshape(-1, 1, 1, 1).contiguous(),
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().clone().contiguous()
    return tensors


def layer_from_aqlm(tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                    quantization_config: dict[str, Any]) -> AQLMLinear:
    """An ``AQLMLinear`` from the tensors of one ``aqlm.QuantizedLinear``."""
    nbits = int(quantization_config["nbits_per_codebook"])
    num_codebooks = int(quantization_config["num_codebooks"])
    group_size = int(quantization_config["in_group_size"])
    codebooks = tensors["codebooks"]
    if codebooks.dim() != 4 or codebooks.shape[2] != 1:
        raise CheckpointError(f"aqlm codebooks of shape {list(codebooks.shape)}: only out_group_size 1 is supported")
    index = unpack_codes(tensors["codes"], nbits)
    return AQLMLinear(
        in_features, out_features, num_codebooks, nbits, group_size,
        bias=tensors.get("bias"),
        codes=index_to_codes(index, nbits),
        codebooks=codebooks[:, :, 0, :].to(torch.float32),
        scales=tensors["scales"].reshape(-1).to(torch.float32),
    )


# ------------------------------------------------------------------------------------------------
# whole models
# ------------------------------------------------------------------------------------------------

def aqlm_layers(model: nn.Module) -> dict[str, AQLMLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AQLMLinear)}


def quantization_config_of(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for an AQLM-quantized ``model``."""
    layers = aqlm_layers(model)
    if not layers:
        raise CheckpointError("the model has no AQLM layers to export")
    kinds = {(m.num_codebooks, m.nbits_per_codebook, m.group_size) for m in layers.values()}
    if len(kinds) > 1:
        raise CheckpointError(
            "transformers' aqlm layout needs one AQLM config for all layers; the model mixes "
            + ", ".join(f"{m}x{b} g={g}" for m, b, g in sorted(kinds)))
    others = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and name not in layers]
    if others:
        raise CheckpointError(f"cannot export non-AQLM quantized layers in the aqlm layout: {', '.join(others[:3])}")
    (num_codebooks, nbits, group_size), = kinds
    not_quantized = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            # transformers <= 4.x matched "<module>.weight", 5.x matches module-name patterns: give both
            not_quantized += [f"{name}.weight", name]
    return {
        "quant_method": "aqlm",
        "num_codebooks": num_codebooks,
        "nbits_per_codebook": nbits,
        "in_group_size": group_size,
        "out_group_size": 1,
        "linear_weights_not_to_quantize": not_quantized,
    }


def _check_linear_skeleton(config, names: list[str]) -> None:
    """Every AQLM layer must sit where the transformers model class has an ``nn.Linear``."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # pragma: no cover - unusual architectures
        raise CheckpointError(f"cannot build {config.model_type} to check the export: {exc}") from None
    for name in names:
        try:
            module = skeleton.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{name} does not exist in a fresh {type(skeleton).__name__}") from None
        if type(module) is not nn.Linear:
            raise CheckpointError(
                f"{name} is a {type(module).__name__} in transformers' {type(skeleton).__name__}; "
                "the aqlm integration only replaces nn.Linear, so this model cannot be exported in that layout")


def export_hf(model: nn.Module, tokenizer, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (a transformers causal LM with ``AQLMLinear`` layers) as a transformers folder.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)`` when
    the ``aqlm`` package is installed (the CPU kernels need float32). ``dtype`` optionally casts the
    non-quantized floating weights (embeddings, norms, lm_head). Returns the folder.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = aqlm_layers(model)
    quant = quantization_config_of(model)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _check_linear_skeleton(config, list(layers))

    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    prefixes = {name + "." for name in layers}
    for key, value in model.state_dict(keep_vars=True).items():
        if any(key.startswith(p) and "." not in key[len(p):] for p in prefixes):
            continue  # written below in the aqlm layout
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:
            continue  # tied weight (lm_head ↔ embeddings): transformers re-ties it on load
        seen[ident] = key
        tensor = value.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.detach().cpu().contiguous().clone()
    for name, layer in layers.items():
        for part, tensor in layer_to_aqlm(layer).items():
            tensors[f"{name}.{part}"] = tensor.cpu().contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})

    config.quantization_config = quant
    config.use_cache = True
    config.save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        try:
            generation_config.save_pretrained(out)
        except (ValueError, OSError):  # pragma: no cover - invalid generation settings are not our business
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_with_transformers(hf_dir: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on an exported folder, the way it must run on CPU.

    Needs the ``aqlm`` package. Its CPU kernel for 8-bit codebooks (aqlm <= 1.1.7) adds into shared
    outputs from parallel numba threads (upstream issue Vahe1994/AQLM#86) and gives slightly wrong,
    run-to-run different results; numba is therefore limited to one thread here.
    """
    from transformers import AutoModelForCausalLM

    try:
        import numba

        numba.set_num_threads(1)
    except ImportError:  # aqlm[gpu] without numba: no CPU LUT kernel to protect
        pass
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, **kwargs).eval()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / WEIGHTS_NAME).is_file():
        return load_file(str(folder / WEIGHTS_NAME))
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(folder / shard)))
        return tensors
    raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} (or sharded index)")


def import_hf(hf_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """Load a transformers + aqlm folder into a causal LM whose quantized layers are ``AQLMLinear``.

    The codes, codebooks and scales come back bit-exactly (codebooks and scales as float32 holding
    the stored float16 values); other weights are cast to ``dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from nibble.models.architecture import set_submodule

    folder = Path(hf_dir)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json")
    config = AutoConfig.from_pretrained(folder)
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if not quant or quant.get("quant_method") != "aqlm":
        raise CheckpointError(f"{folder}/config.json has no quantization_config with quant_method 'aqlm'")
    if int(quant.get("out_group_size", 1)) != 1:
        raise CheckpointError(f"out_group_size={quant['out_group_size']} is not supported (nibble uses 1)")
    del config.quantization_config
    tensors = _read_weights(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    quantized = sorted(key[: -len(".codes")] for key in tensors if key.endswith(".codes"))
    for name in quantized:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{folder}: {name} holds aqlm codes but the model has no such module") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{folder}: {name} holds aqlm codes but is a {type(linear).__name__}")
        parts = {p: tensors.pop(f"{name}.{p}") for p in ("codes", "codebooks", "scales", "bias")
                 if f"{name}.{p}" in tensors}
        missing = {"codes", "codebooks", "scales"} - set(parts)
        if missing:
            raise CheckpointError(f"{folder}: {name} lacks {', '.join(sorted(missing))}")
        if (linear.bias is not None) != ("bias" in parts):
            raise CheckpointError(f"{folder}: {name} bias does not match the model class")
        layer = layer_from_aqlm(parts, linear.in_features, linear.out_features, quant)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dtype)
        set_submodule(model, name, layer)

    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{folder}: unexpected weights {', '.join(result.unexpected_keys[:5])}")
    done = {f"{name}.{part}" for name in quantized for part in ("codes", "codebooks", "scales", "bias")}
    missing = [key for key in result.missing_keys if key not in done]
    if missing:
        model.tie_weights()
        state = model.state_dict(keep_vars=True)
        # a key absent from the file is fine only when it is tied to one that was loaded (lm_head)
        missing = [key for key in missing if not any(state[key] is state[k] for k in tensors if k in state)]
        if missing:
            raise CheckpointError(f"{folder}: missing weights {', '.join(missing[:5])}")
    model.eval()
    return model.to(device)
