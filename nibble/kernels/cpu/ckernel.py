"""nibble's CPU kernels as C entry points for the runtime's C++ decode step (``runtime_abi.cpp``).

Each function describes one layer's tensors in a C struct and returns the ``CKernel`` the decode
step calls with no Python in between, or None when the kernel does not apply:

- ``aqlm_ckernel``: AQLM Kx8, split by inputs (``nb_aqlm_split``: each thread takes an equal share
  of the (code block, output row) pairs and builds a block's lookup tables right before using
  them, or decodes the weights of layers with few rows);
- ``scalar_ckernel``: 8- or 4-bit integer weights with a scale and zero point per group (e.g. an
  output head quantized for decoding, or a GPTQ/RTN layer).
"""

from __future__ import annotations

import ctypes
import logging
from ctypes import c_int, c_int64, c_void_p
from pathlib import Path

import torch

from nibble.kernels.layout import LUT_CODEWORDS, aqlm_blocked_codes, aqlm_float_codebooks

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "runtime_abi.cpp"
HEADERS = ("aqlm_lut.h", "kernels.h", "simd.h")
EXTRA_FLAGS = ("-fno-tree-vectorize",)  # as for the torch op: explicit vectors, no gathers
ROWS_PER_TASK = 64


class AqlmArgs(ctypes.Structure):
    """Mirror of ``nibble::AqlmArgs`` (kernels.h); ctypes applies the C alignment rules."""

    _fields_ = [("x", c_void_p), ("batch", c_int64), ("num_groups", c_int64), ("group_size", c_int),
                ("num_codebooks", c_int), ("codes", c_void_p), ("num_blocks", c_int64), ("out", c_int64),
                ("codebook_size", c_int), ("codebooks", c_void_p), ("codebooks_t", c_void_p),
                ("scales", c_void_p), ("bias", c_void_p), ("y", c_void_p)]


class ScalarArgs(ctypes.Structure):
    """Mirror of ``nibble::ScalarArgs`` (runtime_abi.cpp)."""

    _fields_ = [("q", c_void_p), ("row_bytes", c_int64), ("in_features", c_int64), ("out", c_int64),
                ("group_size", c_int64), ("bits", c_int64), ("scales", c_void_p), ("zeros", c_void_p),
                ("bias", c_void_p)]


SCALAR_BITS = {8: 8, 4: 32}  # code width -> the group size must be a multiple of this


def _library():
    """The entry points' library, or None (with a warning) when it cannot be built here."""
    from nibble.runtime.native import NativeUnavailable, load_source

    try:
        library = load_source(SOURCE, HEADERS, EXTRA_FLAGS)
    except (NativeUnavailable, OSError) as exc:
        log.warning("C kernels unavailable for the decode step: %s", exc)
        return None
    for name in ("nb_aqlm_max_parts", "nb_scalar_workspace_per_row"):
        getattr(library, name).argtypes = [c_void_p]
        getattr(library, name).restype = c_int64
    return library


def _float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().float().contiguous()


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _address(library: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(library, name), c_void_p).value


def aqlm_ckernel(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None):
    """The ``CKernel`` of one AQLM layer; None off the CPU, beyond 256 codewords or 4 codebooks, or
    without a C++ compiler."""
    out_features, num_groups, num_codebooks = codes.shape
    if codes.device.type != "cpu" or codebooks.shape[1] > LUT_CODEWORDS or not 1 <= num_codebooks <= 4:
        return None
    library = _library()
    if library is None:
        return None
    with torch.no_grad():
        blocked = aqlm_blocked_codes(codes)
        books, books_t = aqlm_float_codebooks(codebooks)
        scales32, bias32 = _float32(scales), _float32(bias)
    args = AqlmArgs(None, 0, num_groups, codebooks.shape[2], num_codebooks, blocked.data_ptr(), blocked.shape[0],
                    out_features, LUT_CODEWORDS, books.data_ptr(), books_t.data_ptr(), scales32.data_ptr(),
                    _pointer(bias32), None)
    from nibble.runtime.linears import CKernel

    return CKernel(split=_address(library, "nb_aqlm_split"), context=ctypes.addressof(args),
                   split_parts=library.nb_aqlm_max_parts(ctypes.byref(args)),
                   keep_alive=(args, blocked, books, books_t, scales32, bias32))


def scalar_ckernel(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                   group_size: int, bits: int, bias: torch.Tensor | None = None):
    """The ``CKernel`` of an 8- or 4-bit scalar layer: ``qweight`` [out, words] int32 packed by
    ``formats.packing``, ``scales`` and float ``zeros`` [out, in/group_size]; None for other widths,
    off the CPU, for groups that are not a multiple of 8 (8 bits) or 32 (4 bits) or do not divide
    the inputs, or without a C++ compiler."""
    multiple = SCALAR_BITS.get(bits)
    if multiple is None or qweight.device.type != "cpu" or group_size % multiple or in_features % group_size:
        return None
    library = _library()
    if library is None:
        return None
    q = qweight.contiguous()
    scales32, zeros32, bias32 = _float32(scales), _float32(zeros), _float32(bias)
    args = ScalarArgs(q.data_ptr(), q.shape[1] * 4, in_features, q.shape[0], group_size, bits, scales32.data_ptr(),
                      zeros32.data_ptr(), _pointer(bias32))
    from nibble.runtime.linears import CKernel

    return CKernel(compute=_address(library, "nb_scalar_compute"), context=ctypes.addressof(args),
                   prepare=_address(library, "nb_scalar_prepare"),
                   workspace_per_row=library.nb_scalar_workspace_per_row(ctypes.byref(args)),
                   chunk=ROWS_PER_TASK, keep_alive=(args, q, scales32, zeros32, bias32))


_PREPARE = ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_int64, c_int64, c_void_p, c_int64, c_int64)
_COMPUTE = ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_int64, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_int64)


def ckernel_callable(kernel, out_features: int):
    """``x -> y`` running a split-by-outputs ``CKernel`` from Python on the calling thread (float32
    CPU input of any leading shape): the torch step's way to use a format's C entry points, e.g.
    for a prompt through an 8-bit output head, which would otherwise be decoded to a dense matrix
    on every call."""
    prepare = _PREPARE(kernel.prepare) if kernel.prepare else None
    compute = _COMPUTE(kernel.compute)

    def call(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        y = torch.empty(rows.shape[0], out_features)
        workspace = torch.empty(max(1, kernel.workspace_per_row * rows.shape[0]))
        for part in range(kernel.prepare_parts if prepare else 0):
            prepare(kernel.context, rows.data_ptr(), rows.shape[1], rows.shape[0], workspace.data_ptr(), part,
                    kernel.prepare_parts)
        compute(kernel.context, rows.data_ptr(), rows.shape[1], workspace.data_ptr(), y.data_ptr(), out_features,
                rows.shape[0], 0, out_features)
        return y.reshape(*x.shape[:-1], out_features).to(x.dtype)
    call.keep_alive = kernel  # the kernel's tensors live as long as the callable
    return call
