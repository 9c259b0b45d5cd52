"""Fast matmuls with compressed weights: AQLM and scalar (RTN/GPTQ) formats.

``aqlm_linear`` and ``scalar_linear`` send each call to the best available backend for its device,
config and batch size (see ``registry``): C++ lookup-table / unpacking kernels on the CPU,
Triton kernels on CUDA at small batch, the decode-then-matmul reference otherwise.
``NIBBLE_KERNEL=reference`` (or ``use_backend("reference")``) forces one backend.
"""

from nibble.kernels import builtin as _builtin  # noqa: F401 - registers the built-in backends
from nibble.kernels.layout import clear_cache
from nibble.kernels.registry import (Backend, Call, KernelError, aqlm_call, aqlm_linear, backends, register,
                                     scalar_call, scalar_linear, select, set_backend, use_backend)

__all__ = ["aqlm_linear", "scalar_linear", "select", "aqlm_call", "scalar_call", "use_backend", "set_backend",
           "backends", "register", "Backend", "Call", "KernelError", "clear_cache"]
