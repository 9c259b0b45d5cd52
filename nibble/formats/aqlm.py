"""AQLM additive multi-codebook format.

Layout of one layer with ``M`` codebooks of ``2**B`` codewords of length ``g``:

- ``codes``     [out_features, in_features // g, M], uint8 when B <= 8, else int16 holding the
                 unsigned code's bit pattern (read back with ``& 0xFFFF``);
- ``codebooks`` [M, 2**B, g], stored float16;
- ``scales``    [out_features], one per output channel, stored float16.

Weight row ``o``, input group ``j``: ``W[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m]]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from nibble.formats.base import QuantizedLinear, register_format


def codes_to_index(codes: torch.Tensor) -> torch.Tensor:
    """Stored codes (uint8, or int16 bit patterns) as non-negative int64 indices."""
    if codes.dtype == torch.int16:
        return codes.to(torch.int64) & 0xFFFF
    return codes.to(torch.int64)


def index_to_codes(index: torch.Tensor, bits_per_codebook: int) -> torch.Tensor:
    """Non-negative code indices in their storage dtype (uint8 for B <= 8, int16 otherwise)."""
    if bits_per_codebook <= 8:
        return index.to(torch.uint8)
    return (index.to(torch.int32) - ((index.to(torch.int32) >= 2**15).to(torch.int32) << 16)).to(torch.int16)


def dequantize_additive(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense weight [out, in] (float32) from codes [out, in/g, M], codebooks [M, 2**B, g], scales [out]."""
    out_features, num_groups, num_codebooks = codes.shape
    group_size = codebooks.shape[-1]
    index = codes_to_index(codes)
    books = codebooks.float()
    weight = torch.zeros(out_features, num_groups, group_size, dtype=torch.float32, device=codes.device)
    for m in range(num_codebooks):
        weight += books[m][index[..., m]]
    return (weight.reshape(out_features, num_groups * group_size) * scales.float()[:, None])


# ------------------------------------------------------------------------------------------------
# The layer module
# ------------------------------------------------------------------------------------------------

#: dtype codebooks and scales have on disk (and in ``state_dict``); in memory they are float32
#: holding float16-representable values, so that training can update them.
STORAGE_DTYPE = torch.float16


def round_to_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` rounded to the nearest value the on-disk dtype holds (still float32)."""
    return tensor.detach().to(STORAGE_DTYPE).to(torch.float32)


@register_format
class AQLMLinear(QuantizedLinear):
    """A linear layer stored as AQLM codes, codebooks and per-output-channel scales.

    ``codes`` is a buffer; ``codebooks`` and ``scales`` are ``nn.Parameter`` (``requires_grad``
    off until a trainer turns it on). They are kept float32 in memory but saved float16: call
    ``round_to_storage_()`` after changing them so that the saved model equals the evaluated one.
    """

    format_name = "aqlm"
    projects_under_hessian = True
    #: keep the decoded dense weight between forwards while nothing changes (set False to save memory)
    cache_dequantized: ClassVar[bool] = True
    #: on-disk dtypes of floating tensors (read by ``nibble.formats.checkpoint.storage_state_dict``)
    storage_dtypes: ClassVar[dict[str, torch.dtype]] = {"codebooks": STORAGE_DTYPE, "scales": STORAGE_DTYPE}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_codebooks: int,
        nbits_per_codebook: int,
        group_size: int = 8,
        bias: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
        codebooks: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
    ):
        super().__init__(in_features, out_features, bias)
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        self.num_codebooks = num_codebooks
        self.nbits_per_codebook = nbits_per_codebook
        self.group_size = group_size
        num_groups = in_features // group_size
        code_dtype = torch.uint8 if nbits_per_codebook <= 8 else torch.int16
        if codes is None:
            codes = torch.zeros(out_features, num_groups, num_codebooks, dtype=code_dtype)
        if codebooks is None:
            codebooks = torch.zeros(num_codebooks, 2**nbits_per_codebook, group_size)
        if scales is None:
            scales = torch.ones(out_features)
        if tuple(codes.shape) != (out_features, num_groups, num_codebooks) or codes.dtype != code_dtype:
            raise ValueError(f"codes must be {code_dtype} [{out_features}, {num_groups}, {num_codebooks}], "
                             f"got {codes.dtype} {list(codes.shape)}")
        if tuple(codebooks.shape) != (num_codebooks, 2**nbits_per_codebook, group_size):
            raise ValueError(f"codebooks must be [{num_codebooks}, {2**nbits_per_codebook}, {group_size}], "
                             f"got {list(codebooks.shape)}")
        if tuple(scales.reshape(-1).shape) != (out_features,):
            raise ValueError(f"scales must have {out_features} entries, got {list(scales.shape)}")
        self.register_buffer("codes", codes.detach().clone())
        self.codebooks = nn.Parameter(codebooks.detach().to(torch.float32).clone(), requires_grad=False)
        self.scales = nn.Parameter(scales.detach().reshape(-1).to(torch.float32).clone(), requires_grad=False)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    # --- contract -------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        trainable = torch.is_grad_enabled() and (self.codebooks.requires_grad or self.scales.requires_grad)
        if trainable or not self.cache_dequantized:
            return dequantize_additive(self.codes, self.codebooks, self.scales)
        key = tuple((t.data_ptr(), t._version, t.device) for t in (self.codes, self.codebooks, self.scales))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, dequantize_additive(self.codes, self.codebooks, self.scales))
        return self._cache[1]

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from nibble.kernels import aqlm_linear

        return aqlm_linear(x, self.codes, self.codebooks, self.scales, self.bias)

    def runtime_ckernel(self):
        """C entry points for the runtime's C++ decode step (None when they do not apply here)."""
        from nibble.kernels.cpu.ckernel import aqlm_ckernel

        return aqlm_ckernel(self.codes, self.codebooks, self.scales, self.bias)

    def format_config(self) -> dict[str, Any]:
        return {
            "format": self.format_name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_codebooks": self.num_codebooks,
            "nbits_per_codebook": self.nbits_per_codebook,
            "group_size": self.group_size,
            "bias": self.bias is not None,
        }

    @classmethod
    def empty(cls, config: dict[str, Any]) -> "AQLMLinear":
        bias = torch.zeros(config["out_features"]) if config.get("bias") else None
        return cls(config["in_features"], config["out_features"], config["num_codebooks"],
                   config["nbits_per_codebook"], config.get("group_size", 8), bias=bias)

    def storage_bits(self) -> dict[str, int]:
        return aqlm_storage_bits(self.out_features, self.in_features, self.num_codebooks,
                                 self.nbits_per_codebook, self.group_size)

    @property
    def group_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features // self.group_size)

    def project_(self, weight: torch.Tensor, groups: torch.Tensor | None = None, *,
                 column_weights: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                 beam_size: int = 4) -> None:
        """Re-encode ``weight`` in the selected groups by beam search; codebooks and scales stay.

        Without ``hessian`` each group is fit in plain squared error (groups are independent);
        with it the codes minimise trace((W - Ŵ) H (W - Ŵ)ᵀ) group by group; ``column_weights``
        is the diagonal case, H = diag(column_weights).
        """
        if column_weights is not None:
            if hessian is not None:
                raise ValueError("pass column_weights or hessian, not both")
            hessian = torch.diag(column_weights.float())
        from nibble.quantize.aqlm_search import beam_search

        with torch.no_grad():
            index = codes_to_index(self.codes)
            new_index = beam_search(weight.detach().to(self.codebooks.device, torch.float32), index,
                                    self.codebooks.detach(), self.scales.detach(), hessian=hessian,
                                    beam_size=beam_size, mask=groups)
            self.codes.copy_(index_to_codes(new_index, self.nbits_per_codebook))

    # --- helpers ----------------------------------------------------------------------------
    def round_to_storage_(self) -> "AQLMLinear":
        """Round codebooks and scales to float16-representable values, in place."""
        with torch.no_grad():
            self.codebooks.copy_(round_to_storage(self.codebooks))
            self.scales.copy_(round_to_storage(self.scales))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:
            for name in ("codebooks", "scales"):
                destination[prefix + name] = destination[prefix + name].detach().to(STORAGE_DTYPE)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, aqlm {self.num_codebooks}x"
                f"{self.nbits_per_codebook} g={self.group_size}, {self.bits_per_weight():.3f} bpw")


def aqlm_storage_bits(out_features: int, in_features: int, num_codebooks: int, nbits_per_codebook: int,
                      group_size: int) -> dict[str, int]:
    """Honest on-disk cost of one AQLM layer's weight: codes, float16 codebooks, float16 scales."""
    return {
        "codes": out_features * (in_features // group_size) * num_codebooks * nbits_per_codebook,
        "codebooks": num_codebooks * 2**nbits_per_codebook * group_size * 16,
        "scales": out_features * 16,
    }
