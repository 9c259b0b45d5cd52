"""Kernel-friendly copies of weight tensors, made once per tensor and cached.

An entry is keyed by the tensor object and checked against its data pointer, shape and version
counter, so in-place updates (PV-Tuning's code or codebook steps) rebuild it; it is dropped when
the tensor is freed. Pass a module's own parameter or buffer: ``.data`` is a new object on every
access and would rebuild the copy on every call.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F

BLOCK_GROUPS = 8  # input groups per block of the blocked AQLM code layout (kBlockGroups in C++)
LUT_CODEWORDS = 256

_CACHE: dict[tuple[int, str], tuple[tuple, Any]] = {}


def _stamp(tensor: torch.Tensor) -> tuple:
    # Inference tensors keep no version counter (and asking raises, slowly): they cannot change
    # in place outside inference mode, so their data pointer has to do.
    version = -1 if tensor.is_inference() else tensor._version
    return tensor.data_ptr(), version


def cached(tensor: torch.Tensor, tag: str, make: Callable[[torch.Tensor], Any]) -> Any:
    """``make(tensor)``, computed once per (tensor, tag) while the tensor is unchanged."""
    key, stamp = (id(tensor), tag), _stamp(tensor)
    entry = _CACHE.get(key)
    if entry is not None and entry[0] == stamp:
        return entry[1]
    with torch.no_grad():
        value = make(tensor)
    if entry is None:
        weakref.finalize(tensor, _CACHE.pop, key, None)
    _CACHE[key] = (stamp, value)
    return value


def clear_cache() -> None:
    """Forget every cached layout (they are rebuilt on the next call)."""
    _CACHE.clear()


def float_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous()


def float_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous float32: itself when it is already, else a cached copy."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return cached(t, "float32", float_tensor)


def blocked_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [out, G, M] → [ceil(G/8), out, 8*M]: one row's 8 groups × M codes contiguous.
    uint8 stays uint8; int16 (bit patterns of codes above 8 bits) stays int16."""
    out_features, num_groups, num_codebooks = codes.shape
    num_blocks = -(-num_groups // BLOCK_GROUPS)
    codes = codes if codes.dtype == torch.int16 else codes.to(torch.uint8)
    padded = F.pad(codes, (0, 0, 0, num_blocks * BLOCK_GROUPS - num_groups))
    return padded.view(out_features, num_blocks, BLOCK_GROUPS * num_codebooks).transpose(0, 1).contiguous()


def lut_codebooks(codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks as float32: up to 256 codewords, zero-padded to [M, 256, g] plus the transpose
    [M, g, 256] the tables are built from; wider codebooks as they are, with an empty transpose."""
    books = codebooks.float()
    if books.shape[1] > LUT_CODEWORDS:
        return books.contiguous(), books.new_empty(0)
    books = F.pad(books, (0, 0, 0, LUT_CODEWORDS - books.shape[1])).contiguous()
    return books, books.transpose(1, 2).contiguous()


def aqlm_blocked_codes(codes: torch.Tensor) -> torch.Tensor:
    return cached(codes, "blocked", blocked_codes)


def aqlm_float_codebooks(codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cached(codebooks, "lut", lut_codebooks)
