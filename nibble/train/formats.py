"""Low-precision number formats as exact fake-quantizers.

Every ``quantize_*`` function maps a float32 tensor onto the values a format can represent and
returns them as float32 (simulated low precision: the values are exact, the storage is not).
Every format also lists its representable values (``*_levels``) so that tests can check the
quantizers against a brute-force search.

Formats:

* INTb with a scale: signed symmetric ``{-(2^(b-1)-1) .. 2^(b-1)-1}·s`` or unsigned ``{0 .. 2^b-1}·s``.
* Logarithmic FP4 (sign + 3 exponent bits, no mantissa): one exponent code means zero, the other
  seven give magnitudes ``s·r^-j``. Radix 4 (``r = 4``, IBM's gradient format; phase 0 holds the
  even powers of two ``4^-j``, phase 1 the odd ones ``2·4^-j``) and radix 2 (``r = 2``, the control).
* Minifloats: E2M1 (FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6) and E4M3 (FP8, max 448, used for NVFP4 scales).
* Block formats: MXFP4 (32 E2M1 values share a power-of-two scale) and NVFP4 (16 E2M1 values share
  an E4M3 scale, times one float32 scale per tensor).

Rounding is ``"nearest"`` (ties to even for integers and minifloats, ties away from zero for the
logarithmic formats) or ``"stochastic"`` (unbiased: rounds up with probability equal to the
distance from the lower neighbour in units of the gap, resolved to ``2^-23``). The logarithmic
formats also take ``"nearest-log"``: nearest in the log domain (the midpoint of ``a`` and ``r·a``
is ``a·sqrt(r)``), so that radix-4's even and odd phases always round in opposite directions.

The implementations work on float32 bit fields and in place where they can: on a CPU the
simulation cost is dominated by the number of elementwise passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from nibble.errors import ConfigError

Rounding = Literal["nearest", "stochastic"]
LogRounding = Literal["nearest", "stochastic", "nearest-log"]  # the logarithmic formats' roundings
ROUNDINGS = ("nearest", "stochastic")
LOG_ROUNDINGS = (*ROUNDINGS, "nearest-log")

# --- float32 bit fields and rounding ---------------------------------------------------------

_MANTISSA_BITS = 23
_MANTISSA_MASK = (1 << _MANTISSA_BITS) - 1
_BIAS = 127
_HALF = 1 << (_MANTISSA_BITS - 1)
_TINY = torch.finfo(torch.float32).tiny
_SQRT2_MANTISSA = math.ceil((math.sqrt(2.0) - 1.0) * (1 << _MANTISSA_BITS))  # m/2^23 >= sqrt(2) - 1


def _check_rounding(rounding: str, allowed: tuple[str, ...] = ROUNDINGS) -> None:
    if rounding not in allowed:
        raise ConfigError(f"unknown rounding {rounding!r}: use one of {', '.join(allowed)}")


def random_mantissa(shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integers in ``[0, 2^23)`` (int32) from the global torch generator, two per 64-bit draw."""
    count = math.prod(shape)
    words = torch.empty((count + 1) // 2, dtype=torch.int64, device=device).random_()
    return words.view(torch.int32)[:count].reshape(shape) & _MANTISSA_MASK


def uniform(shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform floats in ``[0, 1)`` on a grid of ``2^-23``."""
    return random_mantissa(shape, device).float().mul_(2.0 ** -_MANTISSA_BITS)


def _round_(x: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """Round ``x`` to integers in place: nearest (ties to even) or stochastic."""
    _check_rounding(rounding)
    if rounding == "nearest":
        return x.round_()
    return x.add_(uniform(x.shape, x.device)).floor_()


def round_to_integer(x: torch.Tensor, rounding: Rounding = "nearest") -> torch.Tensor:
    """Round to integers: nearest (ties to even) or stochastic (up with probability ``x - floor(x)``)."""
    return _round_(x.clone(), rounding)


def _exponent_field(a: torch.Tensor) -> torch.Tensor:
    """Biased exponent field (``floor(log2 a) + 127``; 0 for zero and subnormals) of ``a >= 0``."""
    return a.view(torch.int32) >> _MANTISSA_BITS


def _from_field(field: torch.Tensor) -> torch.Tensor:
    """``2^(field - 127)`` for an int32 field tensor in ``[1, 254]`` (modified in place)."""
    return field.clamp_(1, 254).bitwise_left_shift_(_MANTISSA_BITS).view(torch.float32)


def _as_scale(scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(scale, dtype=torch.float32, device=like.device).clamp_min(_TINY)


# --- integers ------------------------------------------------------------------------------

def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """Smallest and largest integer code: symmetric ``±(2^(b-1)-1)`` if signed, else ``0..2^b-1``."""
    if bits < 2:
        raise ConfigError(f"integer formats need at least 2 bits, got {bits}")
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def int_levels(bits: int, signed: bool = True, scale: float = 1.0) -> torch.Tensor:
    """All values of INTb with ``scale``, ascending."""
    low, high = int_range(bits, signed)
    return torch.arange(low, high + 1, dtype=torch.float32) * scale


def quantize_int(x: torch.Tensor, scale: torch.Tensor | float, bits: int = 4, signed: bool = True,
                 rounding: Rounding = "nearest") -> torch.Tensor:
    """Round ``x / scale`` to INTb codes (saturating) and return ``codes * scale``."""
    low, high = int_range(bits, signed)
    scale = _as_scale(scale, x)
    return _round_(x / scale, rounding).clamp_(low, high).mul_(scale)


# --- logarithmic FP4 (sign + exponent, no mantissa) ----------------------------------------

LOG_MAGNITUDES = 7  # 3 exponent bits: one code is zero, seven are powers of the radix


@dataclass(frozen=True)
class LogFormat:
    """Magnitudes ``{0} ∪ {2^(top - step·j) : j = 0..count-1}`` in units of the scale."""

    step: int  # log2 of the radix: 2 for radix 4, 1 for radix 2
    top: int = 0  # exponent of the largest magnitude: 0 (even phase) or 1 (odd phase)
    count: int = LOG_MAGNITUDES

    @property
    def exponents(self) -> list[int]:
        return [self.top - self.step * j for j in range(self.count)]

    @property
    def bottom(self) -> int:
        return self.top - self.step * (self.count - 1)


RADIX4_EVEN = LogFormat(step=2, top=0)  # 1, 1/4, ..., 4^-6  (even powers of two)
RADIX4_ODD = LogFormat(step=2, top=1)  # 2, 1/2, ..., 2·4^-6 (odd powers of two)
RADIX2 = LogFormat(step=1, top=0)  # 1, 1/2, ..., 2^-6


def log_levels(fmt: LogFormat, scale: float = 1.0) -> torch.Tensor:
    """All values of a logarithmic format (both signs and zero), ascending."""
    magnitudes = torch.tensor([2.0 ** e for e in fmt.exponents], dtype=torch.float32) * scale
    return torch.cat([-magnitudes, torch.zeros(1), magnitudes.flip(0)])


def quantize_log(x: torch.Tensor, scale: torch.Tensor | float, fmt: LogFormat = RADIX4_EVEN,
                 rounding: LogRounding = "nearest") -> torch.Tensor:
    """Round ``|x| / scale`` onto the format's magnitudes (saturating at the top) and restore sign/scale.

    On the float32 bits of ``v = m·2^E``: the neighbours are ``2^L`` and ``2^(L+step)`` with ``L``
    the grid exponent at or just below ``E``; the mantissa decides. Below the smallest level the
    neighbours are 0 and the smallest level (rounded as ``"nearest"`` under ``"nearest-log"`` too).
    """
    if fmt.step not in (1, 2):
        raise ConfigError(f"logarithmic formats need radix 2 or 4, got 2^{fmt.step}")
    _check_rounding(rounding, LOG_ROUNDINGS)
    scale = _as_scale(scale, x)
    v = x.abs().div_(scale)
    bits = v.view(torch.int32)
    field = bits >> _MANTISSA_BITS
    threshold = bits & _MANTISSA_MASK  # stochastic: up iff gap·r < threshold; nearest: up iff threshold >= gap·2^22
    if fmt.step == 1:  # neighbours 2^E, 2^(E+1): P(up) = m - 1
        gap = 1
    else:  # radix 4: P(up) = (m - 1)/3 on the grid, (2m - 1)/3 one above it
        odd = (field - (fmt.top + _BIAS)).bitwise_and_(1)
        threshold.add_(odd * (threshold + (1 << _MANTISSA_BITS)))
        field.sub_(odd)
        gap = 3
    stochastic = rounding == "stochastic"
    r = random_mantissa(v.shape, v.device) if stochastic else None
    if rounding == "nearest-log":  # up iff v >= sqrt(radix) times the lower neighbour
        threshold = odd if fmt.step == 2 else (threshold >= _SQRT2_MANTISSA).int()
    else:
        threshold.sub_(gap * r + 1 if stochastic else gap * _HALF).bitwise_right_shift_(31).add_(1)  # 1 = up
    field.add_(threshold.mul_(fmt.step)).clamp_(fmt.bottom + _BIAS, fmt.top + _BIAS)
    magnitude = _from_field(field)
    u = r.float().mul_(2.0 ** -_MANTISSA_BITS) if stochastic else 0.5
    keep = v.mul_(2.0 ** -fmt.bottom).clamp_(max=1.0).add_(u).floor_().clamp_(max=1.0)  # 0/1 below the bottom
    return magnitude.mul_(keep).copysign_(x).mul_(scale)


# --- minifloats ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FloatFormat:
    """A sign-exponent-mantissa format with subnormals, saturating at ``max_value`` (no inf/NaN)."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_value: float

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (subnormals share it)."""
        return 1 - self.bias


E2M1 = FloatFormat("e2m1", exp_bits=2, man_bits=1, bias=1, max_value=6.0)
E4M3 = FloatFormat("e4m3", exp_bits=4, man_bits=3, bias=7, max_value=448.0)


def float_levels(fmt: FloatFormat) -> torch.Tensor:
    """All non-negative values of a minifloat format, ascending (subnormals included)."""
    values = {0.0}
    for code in range(2 ** fmt.exp_bits):
        exponent = max(code, 1) - fmt.bias
        implicit = 1.0 if code > 0 else 0.0
        for mantissa in range(2 ** fmt.man_bits):
            value = (implicit + mantissa / 2 ** fmt.man_bits) * 2.0 ** exponent
            if value <= fmt.max_value:
                values.add(value)
    return torch.tensor(sorted(values), dtype=torch.float32)


def _round_magnitude_(a: torch.Tensor, fmt: FloatFormat, rounding: Rounding) -> torch.Tensor:
    """Round ``a >= 0`` (in place) to the minifloat's magnitudes, saturating at ``max_value``."""
    field = _exponent_field(a).clamp_(min=fmt.min_exponent + _BIAS).sub_(fmt.man_bits)
    ulp = _from_field(field)
    return _round_(a.div_(ulp), rounding).mul_(ulp).clamp_(max=fmt.max_value)


def quantize_float(x: torch.Tensor, fmt: FloatFormat = E2M1, rounding: Rounding = "nearest") -> torch.Tensor:
    """Round ``x`` (already in format units) to the minifloat, saturating at ``±max_value``."""
    return _round_magnitude_(x.abs(), fmt, rounding).copysign_(x)


# --- block formats -------------------------------------------------------------------------

MX_BLOCK = 32
NV_BLOCK = 16
E2M1_EMAX = 2  # exponent of E2M1's largest power of two (6 = 1.5 * 2^2)


def blockwise(x: torch.Tensor, dim: int, block: int,
              fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn(blocks, axis)`` to ``x`` viewed with ``dim`` split into ``[n_blocks, block]``.

    ``axis`` is the within-block axis of the view; ``dim`` is zero-padded to a multiple of ``block``.
    """
    dim = dim % x.ndim
    length = x.shape[dim]
    pad = (-length) % block
    if pad:
        x = F.pad(x, (0, 0) * (x.ndim - dim - 1) + (0, pad))
    shape = x.shape
    out = fn(x.reshape(*shape[:dim], shape[dim] // block, block, *shape[dim + 1:]), dim + 1)
    out = out.reshape(shape)
    return out.narrow(dim, 0, length) if pad else out


def mx_scale(amax: torch.Tensor, clip_free: bool = False) -> torch.Tensor:
    """MX power-of-two block scale. OCP rule: ``2^(floor(log2 amax) - 2)`` (the block maximum may
    saturate at 6); ``clip_free``: the smallest power of two with ``amax / scale <= 6``."""
    amax = amax.clamp_min(_TINY)
    if clip_free:
        scale = _from_field(_exponent_field(amax / E2M1.max_value))
        return torch.where(scale * E2M1.max_value < amax, scale * 2, scale)
    return _from_field(_exponent_field(amax) - E2M1_EMAX)


def quantize_mxfp4(x: torch.Tensor, dim: int = -1, rounding: Rounding = "nearest",
                   clip_free: bool = False, block: int = MX_BLOCK) -> torch.Tensor:
    """MXFP4: blocks of ``block`` values along ``dim`` share a power-of-two scale, elements are E2M1."""
    def quantize(blocks: torch.Tensor, axis: int) -> torch.Tensor:
        magnitude = blocks.abs()
        scale = mx_scale(magnitude.amax(axis, keepdim=True), clip_free)
        return _round_magnitude_(magnitude.div_(scale), E2M1, rounding).mul_(scale).copysign_(blocks)

    return blockwise(x, dim, block, quantize)


def nv_scales(amax: torch.Tensor, tensor_amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 effective block scales: E4M3-rounded ``block_amax / 6`` (in units of the per-tensor
    scale ``tensor_amax / (6·448)``) times the per-tensor scale."""
    tensor_scale = (tensor_amax / (E2M1.max_value * E4M3.max_value)).clamp_min(_TINY)
    return quantize_float(amax / (E2M1.max_value * tensor_scale), E4M3) * tensor_scale


def quantize_nvfp4(x: torch.Tensor, dim: int = -1, rounding: Rounding = "nearest",
                   block: int = NV_BLOCK) -> torch.Tensor:
    """NVFP4: blocks of ``block`` E2M1 values along ``dim`` share an E4M3 scale; one float32 scale per tensor."""
    tensor_amax = x.abs().amax()

    def quantize(blocks: torch.Tensor, axis: int) -> torch.Tensor:
        magnitude = blocks.abs()
        scale = nv_scales(magnitude.amax(axis, keepdim=True), tensor_amax)
        # a block whose scale rounds to zero saturates, then is multiplied by zero
        return _round_magnitude_(magnitude.div_(scale.clamp_min(_TINY)), E2M1, rounding).mul_(scale).copysign_(blocks)

    return blockwise(x, dim, block, quantize)
