"""Backends of the quantized matmuls, and the choice among them for each call.

A backend declares the format it serves, which calls it accepts (device, config, batch size,
whether gradients are needed), a priority, and an availability check that runs lazily (it may
build the C++ extension or import triton). Each call goes to the highest-priority backend that
accepts it and is available. ``NIBBLE_KERNEL=<name>`` or ``use_backend(name)`` forces one; a
forced backend that cannot serve a call raises ``KernelError`` instead of silently switching.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

AQLM, SCALAR = "aqlm", "scalar"

class KernelError(RuntimeError):
    """A forced backend is unknown or cannot serve the call."""


@dataclass(frozen=True)
class Call:
    """What one matmul asks for. AQLM fills the codebook fields, scalar the bit fields."""

    format: str
    device: str
    batch: int
    in_features: int
    needs_grad: bool = False
    num_codebooks: int = 0
    codebook_size: int = 0
    group_size: int = 0
    bits: int = 0


@dataclass(frozen=True)
class Backend:
    """A kernel: ``run`` takes the arguments of ``aqlm_linear`` or ``scalar_linear``; ``accepts``
    says which calls it serves; ``available`` is checked lazily (and once per kind of call)."""

    name: str
    format: str
    priority: int
    accepts: Callable[[Call], bool]
    run: Callable[..., torch.Tensor]
    available: Callable[[], bool] = lambda: True
    differentiable: bool = False


_BACKENDS: dict[str, dict[str, Backend]] = {AQLM: {}, SCALAR: {}}
_forced: dict[str, str | None] = {"global": None}
_forced_stack: list[str | None] = []


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend; previous choices are forgotten."""
    _BACKENDS[backend.format][backend.name] = backend
    _chosen.clear()
    return backend


def backends(format: str) -> list[Backend]:
    """Registered backends of a format, highest priority first."""
    return sorted(_BACKENDS[format].values(), key=lambda b: -b.priority)


def forced_backend() -> str | None:
    """The forced backend name: innermost ``use_backend``, else ``set_backend``, else NIBBLE_KERNEL."""
    if _forced_stack:
        return _forced_stack[-1]
    return _forced["global"] or os.environ.get("NIBBLE_KERNEL") or None


def set_backend(name: str | None) -> None:
    """Force backend ``name`` for the formats that have one (None: back to NIBBLE_KERNEL/automatic)."""
    _forced["global"] = name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, force backend ``name`` (None: automatic choice, ignoring NIBBLE_KERNEL)."""
    _forced_stack.append(name)
    try:
        yield
    finally:
        _forced_stack.pop()


def _serves(backend: Backend, call: Call) -> bool:
    return (backend.differentiable or not call.needs_grad) and backend.accepts(call)


def select(call: Call) -> Backend:
    """The backend that serves ``call``."""
    table = _BACKENDS[call.format]
    name = forced_backend()
    if name and name in table:
        backend = table[name]
        if not _serves(backend, call):
            raise KernelError(f"kernel backend {name!r} cannot serve {call}")
        if not backend.available():
            raise KernelError(f"kernel backend {name!r} is not available here")
        return backend
    if name and not any(name in t for t in _BACKENDS.values()):
        raise KernelError(f"unknown kernel backend {name!r}; known: {sorted(set().union(*_BACKENDS.values()))}")
    for backend in backends(call.format):
        if _serves(backend, call) and backend.available():
            return backend
    raise KernelError(f"no kernel backend serves {call}")  # unreachable while 'reference' is registered


# Choices already made, by call and forced name: the hot path of a decode step is one dict lookup.
_chosen: dict[tuple, Backend] = {}


def _select_cached(call_fields: tuple, make_call: Callable[[], Call]) -> Backend:
    key = (*call_fields, forced_backend())
    backend = _chosen.get(key)
    if backend is None:
        backend = _chosen[key] = select(make_call())
    return backend


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def aqlm_call(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> Call:
    return Call(AQLM, x.device.type, _rows(x), x.shape[-1], _needs_grad(x, codebooks, scales, bias),
                num_codebooks=codes.shape[-1], codebook_size=codebooks.shape[1], group_size=codebooks.shape[-1])


def scalar_call(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bits: int, group_size: int, bias: torch.Tensor | None = None) -> Call:
    return Call(SCALAR, x.device.type, _rows(x), x.shape[-1], _needs_grad(x, scales, bias),
                group_size=group_size, bits=bits)


def aqlm_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ + bias for AQLM weights (layout in ``nibble.formats.aqlm``), by the best backend.

    x [..., in]; codes [out, in/g, M] (uint8, or int16 bit patterns for B > 8); codebooks
    [M, 2^B, g]; scales [out] (any shape with ``out`` elements); bias [out] or None.
    Returns [..., out] in x.dtype.
    """
    fields = (AQLM, x.device.type, _rows(x), x.shape[-1], _needs_grad(x, codebooks, scales, bias),
              codes.shape[-1], codebooks.shape[1], codebooks.shape[-1])
    backend = _select_cached(fields, lambda: aqlm_call(x, codes, codebooks, scales, bias))
    return backend.run(x, codes, codebooks, scales, bias)


def scalar_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ + bias for packed b-bit integer weights (``nibble.formats.scalar``), by the best backend.

    packed [out, words] int32; scales, zeros [out, in/group_size] (zeros None: symmetric grid
    with midpoint 2^(bits−1)). Returns [..., out] in x.dtype.
    """
    fields = (SCALAR, x.device.type, _rows(x), x.shape[-1], _needs_grad(x, scales, bias), bits, group_size)
    backend = _select_cached(fields, lambda: scalar_call(x, packed, scales, zeros, bits, group_size, bias))
    return backend.run(x, packed, scales, zeros, bits, group_size, bias)
