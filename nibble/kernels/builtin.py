"""The built-in backends, registered on import (see ``registry`` for how one is chosen)."""

from __future__ import annotations

import torch

from nibble.kernels import reference, torch_lut
from nibble.kernels.registry import AQLM, SCALAR, Backend, Call, register

# Largest batch (rows of x) sent to each kind of kernel, from measurements on a 4096x4096 layer,
# 1 CPU thread: the AQLM lookup tables cost 1/5 of decode + matmul at 256 rows and still win at
# 1024; the scalar kernel is at 2/3 of it at 256 rows; the pure-torch tables gather
# [rows, out, groups] values and stop paying off much earlier. The Triton kernels are written for
# decoding (1 to 8 rows).
CPU_LUT_MAX_BATCH = 2048
CPU_SCALAR_MAX_BATCH = 256
TORCH_LUT_MAX_BATCH = 16
GPU_MAX_BATCH = 8


def _cpu_available() -> bool:
    from nibble.kernels import cpu
    return cpu.available()


def _cpu_aqlm(*args: torch.Tensor | None) -> torch.Tensor:
    from nibble.kernels import cpu
    return cpu.aqlm_lut_linear(*args)


def _cpu_scalar(*args) -> torch.Tensor:
    from nibble.kernels import cpu
    return cpu.scalar_linear(*args)


def _triton_available() -> bool:
    from nibble.kernels import triton as triton_kernels
    return triton_kernels.available()


def _triton_aqlm(*args: torch.Tensor | None) -> torch.Tensor:
    from nibble.kernels import triton as triton_kernels
    return triton_kernels.aqlm_linear(*args)


def _triton_scalar(*args) -> torch.Tensor:
    from nibble.kernels import triton as triton_kernels
    return triton_kernels.scalar_linear(*args)


def _small_books(call: Call) -> bool:
    return call.codebook_size <= 256


def _torch_lut_accepts(call: Call) -> bool:
    return call.device == "cpu" and call.batch <= TORCH_LUT_MAX_BATCH and _small_books(call)


def _cpu_lut_accepts(call: Call) -> bool:
    """Lookup tables for up to 256 codewords, decoding (groups of 8) for up to 65536."""
    fits = _small_books(call) or (call.codebook_size <= 65536 and call.group_size == 8)
    return call.device == "cpu" and call.batch <= CPU_LUT_MAX_BATCH and 1 <= call.num_codebooks <= 4 and fits


def _cpu_scalar_accepts(call: Call) -> bool:
    return (call.device == "cpu" and call.batch <= CPU_SCALAR_MAX_BATCH and call.bits in (2, 4)
            and call.group_size % (32 // call.bits) == 0 and call.in_features % call.group_size == 0)


def _triton_aqlm_accepts(call: Call) -> bool:
    return (call.device == "cuda" and 1 <= call.batch <= GPU_MAX_BATCH and call.group_size == 8
            and (call.num_codebooks, call.codebook_size) in ((1, 65536), (2, 256))
            and call.in_features % 8 == 0)


def _triton_scalar_accepts(call: Call) -> bool:
    return (call.device == "cuda" and 1 <= call.batch <= GPU_MAX_BATCH and call.bits in (2, 4)
            and call.group_size % (32 // call.bits) == 0 and call.in_features % call.group_size == 0)


register(Backend("reference", AQLM, 0, lambda call: True, reference.aqlm_linear, differentiable=True))
register(Backend("torch-lut", AQLM, 10, _torch_lut_accepts, torch_lut.aqlm_linear))
register(Backend("cpu-lut", AQLM, 100, _cpu_lut_accepts, _cpu_aqlm, _cpu_available))
register(Backend("triton", AQLM, 100, _triton_aqlm_accepts, _triton_aqlm, _triton_available))
register(Backend("reference", SCALAR, 0, lambda call: True, reference.scalar_linear, differentiable=True))
register(Backend("cpu-scalar", SCALAR, 100, _cpu_scalar_accepts, _cpu_scalar, _cpu_available))
register(Backend("triton", SCALAR, 100, _triton_scalar_accepts, _triton_scalar, _triton_available))
