"""nibble checkpoints: safetensors + JSON, written so that an interrupted write never looks complete.

A finished checkpoint folder holds
- ``model.safetensors``: every tensor of the model (quantized layers' codes, scales, codebooks;
  embeddings and head in the storage dtype, float16 by default; norm weights and biases float32);
- ``config.json`` and tokenizer files: the base architecture, as transformers writes them;
- ``nibble_config.json``: the method config, calibration settings, per-layer formats, bit counts,
  and the size and sha256 of ``model.safetensors``. It is written last, atomically: a folder
  without it is not a checkpoint.

While a quantization runs, ``.nibble-partial/`` holds ``progress.json`` and one
``block_NNN.safetensors`` per finished block, so that ``--resume`` continues after the last one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nibble.errors import CheckpointError, OutputExistsError
from nibble.formats.base import FORMATS, QuantizedLinear
from nibble.models.architecture import decoder_blocks, normalize_linear_layers, set_submodule

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
NIBBLE_CONFIG = "nibble_config.json"
PARTIAL = ".nibble-partial"
PROGRESS = "progress.json"


# --- small file helpers -----------------------------------------------------------------------
def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from None


# --- state dicts in storage dtypes --------------------------------------------------------------
def storage_state_dict(module: nn.Module, float_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with floating tensors cast to their storage dtype, tied copies dropped.

    Quantized layers declare per-tensor storage dtypes (``storage_dtypes``); other floating matrices
    (embeddings, head) are stored as ``float_dtype`` and vectors (norm weights, biases) as float32.
    """
    declared: dict[str, torch.dtype] = {}
    for prefix, child in module.named_modules():
        for name, dtype in getattr(child, "storage_dtypes", {}).items():
            declared[f"{prefix}.{name}" if prefix else name] = dtype
    tensors, seen = {}, set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.data_ptr() and key in seen:
            continue
        seen.add(key)
        if tensor.is_floating_point():
            default = float_dtype if tensor.dim() > 1 else torch.float32  # norms and biases stay exact
            tensor = tensor.to(declared.get(name, default))
        tensors[name] = tensor
    return tensors


def load_storage_state_dict(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load tensors saved by ``storage_state_dict``; only tied duplicates may be absent."""
    try:
        result = module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{where} does not match the model: {str(exc).splitlines()[0]}") from None
    pointers = {name: t.data_ptr() for name, t in module.state_dict().items()}
    loaded = {pointers[name] for name in tensors if name in pointers}
    missing = {name for name in result.missing_keys if pointers.get(name) not in loaded}
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{where} does not match the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(result.unexpected_keys)[:3]}")


# --- layer formats ----------------------------------------------------------------------------
def quantized_layer_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: m.format_config() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def install_quantized_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace the named layers by empty quantized modules of the recorded formats."""
    for name, config in layers.items():
        fmt = config.get("format")
        if fmt not in FORMATS:
            raise CheckpointError(f"layer {name}: unknown weight format {fmt!r}")
        try:
            reference = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name} of the checkpoint does not exist in the model") from None
        layer = FORMATS[fmt].empty(config).to(next(reference.parameters()).device)
        set_submodule(model, name, layer)


# --- output folders ---------------------------------------------------------------------------
def prepare_output_dir(out_dir: str | Path, resume: bool) -> Path:
    """Create ``out_dir``; refuse a non-empty one unless resuming a partial run there."""
    out = Path(out_dir)
    if resume:
        if not (out / PARTIAL / PROGRESS).is_file():
            raise CheckpointError(f"nothing to resume in {out}: no {PARTIAL}/{PROGRESS}")
        return out
    refuse_used_output_dir(out)
    (out / PARTIAL).mkdir(parents=True, exist_ok=True)
    return out


def refuse_used_output_dir(out: Path) -> None:
    """Raise if ``out`` holds anything but an empty ``.nibble-partial`` (left by a run that failed to start)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a folder")
    partial = out / PARTIAL
    contents = [p for p in out.iterdir() if not (p == partial and p.is_dir() and not any(p.iterdir()))]
    if contents:
        raise OutputExistsError(f"output folder {out} already exists and is not empty (use --resume to continue a run)")


class PartialRun:
    """The per-block state of a quantization in progress, under ``OUT/.nibble-partial``."""

    def __init__(self, out_dir: Path, run_config: dict[str, Any]):
        self.folder = Path(out_dir) / PARTIAL
        self.run_config = run_config

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / PROGRESS, {"run": self.run_config, "completed": 0, "layers": {}})

    def load_progress(self) -> dict[str, Any]:
        progress = read_json(self.folder / PROGRESS)
        if progress.get("run") != self.run_config:
            raise CheckpointError(f"cannot resume: {self.folder} was started with different settings")
        return progress

    def save_block(self, index: int, block: nn.Module) -> None:
        progress = self.load_progress()
        save_tensors_atomic(storage_state_dict(block, torch.float32), self.folder / f"block_{index:03d}.safetensors")
        progress["layers"].update({f"{index}.{k}": v for k, v in quantized_layer_configs(block).items()})
        progress["completed"] = index + 1
        write_json_atomic(self.folder / PROGRESS, progress)

    def restore(self, model: nn.Module) -> int:
        """Load finished blocks into ``model``; returns how many there are."""
        progress = self.load_progress()
        blocks = decoder_blocks(model)
        for index in range(progress["completed"]):
            prefix = f"{index}."
            layers = {k[len(prefix):]: v for k, v in progress["layers"].items() if k.startswith(prefix)}
            install_quantized_layers(blocks[index], layers)
            path = self.folder / f"block_{index:03d}.safetensors"
            load_storage_state_dict(blocks[index], load_tensors(path), str(path))
        return progress["completed"]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# --- whole checkpoints ------------------------------------------------------------------------
def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, meta: dict[str, Any],
                   float_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Write a finished checkpoint into ``out_dir``; ``nibble_config.json`` goes last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    save_tensors_atomic(storage_state_dict(model, float_dtype), weights)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    config = {
        "format_version": FORMAT_VERSION,
        **meta,
        "float_dtype": str(float_dtype).removeprefix("torch."),
        "layers": quantized_layer_configs(model),
        "weights": {"file": WEIGHTS, "bytes": weights.stat().st_size, "sha256": sha256_of(weights)},
    }
    write_json_atomic(out / NIBBLE_CONFIG, config)
    return config


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32, verify: bool = True) -> nn.Module:
    """Rebuild a model saved by ``save_quantized``; raises ``CheckpointError`` if anything is off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = read_json(folder / NIBBLE_CONFIG)
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: unsupported checkpoint version {config.get('format_version')!r}")
    weights = folder / config.get("weights", {}).get("file", WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    expected = config["weights"]
    if weights.stat().st_size != expected["bytes"]:
        raise CheckpointError(f"{weights} is truncated: {weights.stat().st_size} bytes, expected {expected['bytes']}")
    if verify and sha256_of(weights) != expected["sha256"]:
        raise CheckpointError(f"{weights} is corrupt: sha256 does not match {NIBBLE_CONFIG}")
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}/config.json is unusable: {exc}") from None
    hf_config.use_cache = False
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    normalize_linear_layers(model)
    install_quantized_layers(model, config["layers"])
    load_storage_state_dict(model, load_tensors(weights), str(weights))
    model.nibble_config = config
    return model.eval()
