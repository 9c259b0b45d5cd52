"""F16, Q2_K and IQ2_XXS GGUFs of the built-in SmolLM2-135M for the llama.cpp rows of ``decode.py``.

Everything goes through the ``llama-cpp-python`` package (benchmark-only dependency):
``llama_model_quantize`` turns the shipped Q4_1 GGUF into F16 (dequantized, so F16 holds exactly the
weights nibble's fp32 model has, up to float16 rounding), and the F16 file into Q2_K and IQ2_XXS.
IQ2_XXS needs an importance matrix: it is computed here, llama-imatrix style (mean squared input
activation per column of every linear), from the fp32 model on 8 x 512 tokens of nibble's C4
calibration split (``NIBBLE_DATA``).
Files go to ``$NIBBLE_CACHE/gguf`` (default ``~/.cache/nibble/gguf``), never into the repository.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

FTYPES = {"F16": 1, "Q2_K": 10, "IQ2_XXS": 19}  # llama_ftype values (llama.h)
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_dir() -> Path:
    root = os.environ.get("NIBBLE_CACHE") or Path.home() / ".cache" / "nibble"
    return Path(root) / "gguf"


class ImatrixEntry(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float)), ("size", ctypes.c_size_t)]


def importance_matrix(model, token_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input column of every decoder linear, by GGUF tensor name."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for index, block in enumerate(model.model.layers):
        for attr, gguf_name in GGUF_NAMES.items():
            module = getattr(block.self_attn, attr, None) or getattr(block.mlp, attr)
            name = f"blk.{index}.{gguf_name}.weight"

            def hook(_module, inputs, _output, name=name):
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for tokens in token_batches:
                model(tokens)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: total / counts[name] for name, total in sums.items()}


def quantize(source: Path, target: Path, ftype: str, imatrix: dict[str, torch.Tensor] | None = None,
             allow_requantize: bool = False) -> Path:
    """``llama_model_quantize(source -> target)`` to ``ftype``, optionally with an importance matrix."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = torch.get_num_threads()
    params.allow_requantize = allow_requantize
    keep = []
    if imatrix:
        entries = (ImatrixEntry * (len(imatrix) + 1))()
        for slot, (name, values) in zip(entries, imatrix.items()):
            data = values.float().contiguous()
            keep.append(data)
            slot.name = name.encode()
            slot.data = ctypes.cast(data.data_ptr(), ctypes.POINTER(ctypes.c_float))
            slot.size = data.numel()
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} failed ({status})")
    partial.rename(target)
    return target


def calibration_batches(tokenizer, count: int = 8, length: int = 512) -> list[torch.Tensor]:
    """``count`` windows of ``length`` tokens of nibble's C4 calibration split (``NIBBLE_DATA``)."""
    from nibble.data.corpus import load_text

    text = load_text("c4", split="train")
    ids = tokenizer(text[: count * length * 8])["input_ids"]
    return [torch.tensor([ids[i * length:(i + 1) * length]]) for i in range(count)]


def ensure_ggufs(source_gguf: Path, model=None, tokenizer=None) -> dict[str, Path]:
    """Paths of the F16, Q2_K and IQ2_XXS files, creating those that are missing."""
    folder = gguf_dir()
    paths = {name: folder / f"SmolLM2-135M-Instruct.{name}.gguf" for name in FTYPES}
    if not paths["F16"].is_file():
        quantize(source_gguf, paths["F16"], "F16", allow_requantize=True)
    if not paths["Q2_K"].is_file():
        quantize(paths["F16"], paths["Q2_K"], "Q2_K")
    if not paths["IQ2_XXS"].is_file():
        if model is None or tokenizer is None:
            raise ValueError("making IQ2_XXS needs the fp32 model and tokenizer for the importance matrix")
        imatrix = importance_matrix(model, calibration_batches(tokenizer))
        quantize(paths["F16"], paths["IQ2_XXS"], "IQ2_XXS", imatrix=imatrix)
    return paths
