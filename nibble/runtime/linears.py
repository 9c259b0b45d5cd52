"""Turning the model's linear modules into plain callables for the decode loop.

A plain ``nn.Linear`` becomes ``F.linear`` over its own weight (and can be fused with its siblings
into one matrix). Any other module is called as it is, unless it offers a faster entry point:

- ``runtime_linear() -> Callable[[Tensor], Tensor]``: a callable with the module's tensors already
  bound (what a quantized format's kernel wants to be called as);
- ``runtime_ckernel() -> CKernel``: C entry points the C++ decode step calls directly, with no
  Python in between and its own thread pool splitting the output rows (see ``CKernel``);
  ``runtime_linear`` or ``forward`` still serve the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

LinearFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CKernel:
    """A linear layer's float32 C kernel, in the form ``csrc/llama_decode.cpp`` calls it.

    Split by outputs: ``compute`` is the address of ``void compute(void* ctx, const float* x,
    int64_t x_stride, const float* workspace, float* y, int64_t y_stride, int64_t rows,
    int64_t out_begin, int64_t out_end)`` filling ``y[r, o]`` for ``out_begin <= o < out_end``; it
    is called from several threads at once on disjoint ranges of ``chunk`` rows, so it must not
    start threads. ``prepare`` (optional): address of ``void prepare(void* ctx, const float* x,
    int64_t x_stride, int64_t rows, float* workspace, int64_t part, int64_t parts)``, run before
    ``compute`` (e.g. lookup tables of ``x``) as ``prepare_parts`` concurrent calls, ``part`` =
    0 .. parts-1, each filling its own share of the workspace; ``workspace_per_row`` floats per
    input row are provided.
    Split by inputs (used instead when set): ``split`` is the address of ``void split(void* ctx,
    const float* x, int64_t x_stride, int64_t rows, float* y, int64_t y_stride, int64_t part,
    int64_t parts)`` writing part ``part``'s share of the sum over input features for every output
    (the bias in part 0 only); up to ``split_parts`` parts (one per thread) run concurrently and
    the step adds them up. Strides count floats.
    ``keep_alive`` is held as long as the runtime (whatever ``context`` points into).
    """

    compute: int | None = None
    context: int = 0
    prepare: int | None = None
    workspace_per_row: int = 0
    chunk: int = 64
    keep_alive: Any = None
    prepare_parts: int = 1
    split: int | None = None
    split_parts: int = 1

    def __post_init__(self) -> None:
        if self.compute is None and self.split is None:
            raise ValueError("a CKernel needs a compute or a split entry point")


@dataclass
class PreparedLinear:
    """One linear map ``y = x W^T + b`` in the form the decode loop calls.

    Either ``weight`` is set (dense) or ``module_fn`` computes it; ``ckernel`` optionally gives C
    entry points for the C++ decode step.
    """

    out_features: int
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    module_fn: LinearFn | None = None
    ckernel: CKernel | None = None

    def __post_init__(self) -> None:
        if self.weight is not None:
            self._call = partial(F.linear, weight=self.weight, bias=self.bias)
        else:
            self._call = self.module_fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x)

    @property
    def is_dense(self) -> bool:
        return self.weight is not None


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (exact type) without hooks: its weight can be used directly."""
    return type(module) is nn.Linear and not _has_hooks(module)


def prepare_linear(module: nn.Module) -> PreparedLinear:
    """The fastest way to call ``module`` that gives the same result as ``module(x)``."""
    out_features = _out_features(module)
    if is_plain_linear(module):
        return PreparedLinear(out_features, weight=module.weight.detach(), bias=_detached(module.bias))
    if _has_hooks(module):
        return PreparedLinear(out_features, module_fn=module)
    function = module.runtime_linear() if hasattr(module, "runtime_linear") else module.forward
    ckernel = module.runtime_ckernel() if hasattr(module, "runtime_ckernel") else None
    return PreparedLinear(out_features, module_fn=function, ckernel=ckernel)


def fuse_linears(modules: list[nn.Module]) -> PreparedLinear | None:
    """One dense linear computing all of ``modules`` side by side, or None when they cannot be fused.

    The modules' weights (and biases) become views into the fused tensors, so no memory is doubled.
    """
    if not all(is_plain_linear(m) for m in modules):
        return None
    weights = [m.weight.detach() for m in modules]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    weight = torch.cat(weights)
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias.detach() if m.bias is not None else w.new_zeros(w.shape[0])
                          for m, w in zip(modules, weights)])
    offset = 0
    for module, part in zip(modules, weights):
        rows = slice(offset, offset + part.shape[0])
        module.weight.data = weight[rows]
        if module.bias is not None:
            module.bias.data = bias[rows]
        offset += part.shape[0]
    return PreparedLinear(weight.shape[0], weight=weight, bias=bias)


def prepare_group(modules: list[nn.Module], fuse: bool = True) -> list[PreparedLinear]:
    """``modules`` as one fused linear when possible (``fuse``), else one prepared linear each."""
    fused = fuse_linears(modules) if fuse else None
    return [fused] if fused is not None else [prepare_linear(m) for m in modules]


def _out_features(module: nn.Module) -> int:
    if hasattr(module, "out_features"):
        return int(module.out_features)
    raise TypeError(f"{type(module).__name__} has no out_features; cannot use it as a linear layer")


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)
