"""Range fitting and transforms around the number formats.

* SAWB (Choi et al., 2018): the INT weight clip is a linear function of two statistics,
  ``alpha = c1·sqrt(E[w²]) - c2·E[|w|]``, with coefficients fitted per bit width to the
  MSE-optimal clips of a family of distributions. Re-computed from the weights at every step.
* PACT (Choi et al., 2018): activations are clipped to a learnable ``[0, alpha]`` (or
  ``[-alpha, alpha]`` for signed inputs) and quantized with step ``alpha / qmax``; the gradient
  reaching ``alpha`` is the sum of the upstream gradient where the input was clipped. (The
  quantized layers learn the clip of non-negative inputs only; signed inputs take the SAWB clip
  of each batch, with straight-through gradients, see ``nibble.train.layers``.)
* GradScale: a per-tensor power-of-two scale that maps the largest gradient onto the top of the
  logarithmic FP4 range (``max|g| / scale`` in ``(1/2, 1]``), re-computed at every backward.
* Two-phase rounding (Sun et al., 2020): the same gradient rounded onto even powers of two for one
  backward GEMM and onto odd powers of two for the other.
* Random Hadamard transform: ``H·diag(signs)`` applied blockwise along a GEMM's reduction dimension
  to both operands leaves the product unchanged and spreads outliers before FP4 quantization.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from nibble.errors import ConfigError
from nibble.train.formats import (
    RADIX2, RADIX4_EVEN, RADIX4_ODD, LogFormat, LogRounding, blockwise, int_range, quantize_int, quantize_log,
    uniform,
)

# --- SAWB ----------------------------------------------------------------------------------

# (c1, c2) per bit width for the symmetric grid {-qmax..qmax}·alpha/qmax, from
# fit_sawb_coefficients(bits) (seed 0); tests re-fit and compare.
SAWB_COEFFICIENTS: dict[int, tuple[float, float]] = {
    2: (2.433, 1.504),
    3: (6.958, 6.291),
    4: (11.982, 11.884),
    5: (17.374, 17.989),
    8: (36.788, 40.173),
}


def _unit_variance_samples(count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Samples of symmetric distributions, each scaled to unit variance."""
    u = torch.rand(count, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    normal = torch.randn(count, generator=generator, dtype=torch.float64)
    chi = torch.randn(count, 6, generator=generator, dtype=torch.float64).pow(2).sum(1) / 6
    raw = {
        "uniform": u - 0.5,
        "normal": normal,
        "logistic": torch.log(u / (1 - u)),
        "laplace": -torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs()),
        "student-t6": torch.randn(count, generator=generator, dtype=torch.float64) / chi.sqrt(),
    }
    return {name: x / x.pow(2).mean().sqrt() for name, x in raw.items()}


def mse_optimal_clip(x: torch.Tensor, bits: int, candidates: int = 64) -> float:
    """The clip ``alpha`` in ``(0, max|x|]`` minimising the INTb (signed) quantization MSE of ``x``.

    A grid search over ``candidates`` clips, refined once around the best one.
    """
    qmax = int_range(bits, signed=True)[1]
    x = x.float()
    low, high = 0.0, float(x.abs().max())
    for _ in range(2):
        alphas = torch.linspace(low, high, candidates + 1)[1:]
        errors = torch.stack([(quantize_int(x, a / qmax, bits) - x).pow(2).mean() for a in alphas])
        best = int(errors.argmin())
        width = (high - low) / candidates
        low, high = max(float(alphas[best]) - width, width / candidates), float(alphas[best]) + width
    return float(alphas[best])


def fit_sawb_coefficients(bits: int, count: int = 2 ** 16, seed: int = 0) -> tuple[float, float]:
    """Least-squares fit of ``alpha* ≈ c1·sqrt(E[w²]) - c2·E[|w|]`` over several distributions."""
    generator = torch.Generator().manual_seed(seed)
    rows, targets = [], []
    for x in _unit_variance_samples(count, generator).values():
        rows.append([float(x.pow(2).mean().sqrt()), -float(x.abs().mean())])
        targets.append(mse_optimal_clip(x, bits))
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(targets, dtype=torch.float64)[:, None]).solution
    return float(solution[0]), float(solution[1])


def sawb_clip(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """SAWB clip for ``w`` (a 0-d tensor), kept within ``(0, max|w|]``."""
    if bits not in SAWB_COEFFICIENTS:
        raise ConfigError(f"no SAWB coefficients for {bits} bits: use one of {sorted(SAWB_COEFFICIENTS)}")
    c1, c2 = SAWB_COEFFICIENTS[bits]
    w = w.detach()
    alpha = c1 * w.pow(2).mean().sqrt() - c2 * w.abs().mean()
    amax = w.abs().max()
    return torch.where((alpha > 0) & (alpha < amax), alpha, amax)


def quantize_weight_sawb(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Signed INTb quantization of ``w`` with the SAWB clip."""
    return quantize_int(w, sawb_clip(w, bits) / int_range(bits, signed=True)[1], bits, signed=True)


# --- PACT ----------------------------------------------------------------------------------

class _PACTClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, signed: bool) -> torch.Tensor:
        low = -alpha if signed else torch.zeros_like(alpha)
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        return torch.minimum(torch.maximum(x, low), alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, alpha = ctx.saved_tensors
        above = x >= alpha
        below = x <= -alpha if ctx.signed else x < 0
        grad_x = grad.masked_fill(above | below, 0.0)
        grad_alpha = grad[above].sum() - (grad[below].sum() if ctx.signed else 0.0)
        return grad_x, grad_alpha.reshape(alpha.shape), None


def pact_clip(x: torch.Tensor, alpha: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """Clip ``x`` to ``[0, alpha]`` (``[-alpha, alpha]`` if signed) with PACT's gradients."""
    return _PACTClip.apply(x, alpha, signed)


def quantize_activation_pact(x: torch.Tensor, alpha: torch.Tensor | float, bits: int = 4,
                             signed: bool = False) -> torch.Tensor:
    """INTb quantization of an already-clipped activation with step ``alpha / qmax``."""
    qmax = int_range(bits, signed)[1]
    return quantize_int(x, torch.as_tensor(alpha).detach() / qmax, bits, signed)


def init_pact_alpha(x: torch.Tensor, bits: int = 4, signed: bool = False, candidates: int = 64,
                    sample: int = 2 ** 16) -> float:
    """A starting clip: the one (among fractions of ``max|x|``) minimising the INTb quantization MSE
    of an evenly strided sample of at most ``sample`` elements."""
    x = x.detach().float().flatten()
    x = x[::max(1, x.numel() // sample)]
    amax = float(x.abs().max())
    if amax == 0:
        return 1.0
    qmax = int_range(bits, signed)[1]
    low = -1.0 if signed else 0.0
    best, best_error = amax, math.inf
    for fraction in torch.linspace(1.0 / candidates, 1.0, candidates).tolist():
        alpha = fraction * amax
        error = float((quantize_int(x.clamp(low * alpha, alpha), alpha / qmax, bits, signed) - x).pow(2).mean())
        if error < best_error:
            best, best_error = alpha, error
    return best


# --- gradients: GradScale, logarithmic FP4, two-phase rounding -------------------------------

def grad_scale(g: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Power-of-two scale ``2^ceil(log2 max|g|)`` (1 where ``g`` is all zero or not finite): one per
    tensor, or with ``dim`` one per slice along ``dim`` (keepdim)."""
    amax = g.detach().abs().amax() if dim is None else g.detach().abs().amax(dim=dim, keepdim=True)
    amax = amax.float()
    amax = torch.where(torch.isfinite(amax) & (amax > 0), amax, torch.ones_like(amax))
    mantissa, exponent = torch.frexp(amax)
    return torch.ldexp(torch.ones_like(mantissa), exponent - (mantissa == 0.5).int())


def dither_gain(fmt: LogFormat) -> float:
    """Expected gain (rounded / value) of round-to-nearest on ``fmt``'s grid for a value at a
    uniformly random position of its log-periodic grid: ``2(r-1) / ((r+1)·ln r)``, ``r`` the radix
    (0.866 for radix 4, 0.962 for radix 2); away from saturation and underflow."""
    radix = 2.0 ** fmt.step
    return 2 * (radix - 1) / ((radix + 1) * math.log(radix))


def quantize_grad_log(g: torch.Tensor, fmt: LogFormat, rounding: LogRounding = "nearest",
                      dim: int | None = None, block: int = 0, dither: bool = False,
                      debias: bool = False) -> torch.Tensor:
    """Logarithmic FP4 gradient with a per-tensor GradScale, or (``dim``: the GEMM's reduction
    dimension) one GradScale per output vector of the GEMM (an ablation of the per-tensor scale),
    or with ``block`` one per ``block`` consecutive values along ``dim`` (microscaling).

    ``dither``: each GradScale is raised by a random ``2^u``, ``u`` uniform over one period of the
    grid (``[0, log2 radix)``). Round-to-nearest gives a value a gain (rounded / value) that depends
    on where it falls on the log-periodic grid, the same at every step: a bias that momentum
    accumulates. The random shift makes that position uniform, so the expected gain is the same
    for every value, while the rounding stays deterministic (one random number per scale, not per
    element as in stochastic rounding). ``debias`` (with ``dither`` and nearest rounding) divides
    the result by that expected gain, :func:`dither_gain`, making it unbiased.
    """
    if debias and not (dither and rounding == "nearest"):
        raise ConfigError("debias divides out the mean gain of dithered round-to-nearest: it needs "
                          "dither=True and rounding='nearest'")

    def quantize(x: torch.Tensor, scale_dim: int | None) -> torch.Tensor:
        scale = grad_scale(x, scale_dim)
        if dither:
            scale = scale * torch.exp2(uniform(scale.shape, x.device) * fmt.step)
        q = quantize_log(x, scale, fmt, rounding)
        return q.div_(dither_gain(fmt)) if debias else q

    if block:
        if dim is None:
            raise ConfigError("a GradScale per block needs the dimension to block along (dim)")
        return blockwise(g, dim, block, quantize)
    return quantize(g, dim)


def two_phase_round(g: torch.Tensor, rounding: LogRounding = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Radix-4 FP4 copies of ``g`` under one GradScale: (even powers of two, odd powers of two)."""
    scale = grad_scale(g)
    return quantize_log(g, scale, RADIX4_EVEN, rounding), quantize_log(g, scale, RADIX4_ODD, rounding)


def interleaved_two_phase_round(g: torch.Tensor, dim: int, first: LogFormat = RADIX4_EVEN,
                                rounding: LogRounding = "nearest") -> torch.Tensor:
    """Radix-4 FP4 ``g`` whose phase alternates along ``dim`` (a GEMM's reduction dimension): even
    indices on ``first``'s powers of two, odd indices on the other phase's, under one GradScale.

    Round-to-nearest gives each value a gain that depends only on where it falls between two
    levels, so values of similar size that a GEMM sums (one feature's gradient over many tokens)
    share one error and it adds up coherently. The two phases' grids are offset by a factor of
    two, so their gains differ; alternating them along the reduction averages the two. The GEMM
    stays a 4-bit GEMM: it is two GEMMs over the halves of the reduction, with scales differing
    by two (scales outside each GEMM's reduction, as hardware needs).
    """
    second = RADIX4_ODD if first == RADIX4_EVEN else RADIX4_EVEN
    scale = grad_scale(g)
    out = torch.empty_like(g)
    index = [slice(None)] * g.dim()
    for start, fmt in ((0, first), (1, second)):
        index[dim] = slice(start, None, 2)
        out[tuple(index)] = quantize_log(g[tuple(index)], scale, fmt, rounding)
    return out


LOG_FORMATS = {"log4-even": RADIX4_EVEN, "log4-odd": RADIX4_ODD, "log2": RADIX2}


# --- random Hadamard transform -------------------------------------------------------------

@lru_cache(maxsize=16)
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ConfigError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_matrix(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size ``n`` (a power of two)."""
    return _hadamard_cpu(n).to(device=device, dtype=dtype)


def random_signs(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` independent ±1 values from the global torch generator."""
    return torch.randint(0, 2, (n,), device=device).float() * 2 - 1


def random_hadamard(x: torch.Tensor, signs: torch.Tensor, block: int, dim: int = 0) -> torch.Tensor:
    """Apply ``H_block·diag(signs)`` blockwise along ``dim``, zero-padding it to a multiple of ``block``.

    ``signs`` has one entry per padded position; the result keeps the padded length. Applying the
    same transform to both operands along a GEMM's reduction dimension leaves the product unchanged.
    """
    dim = dim % x.ndim
    length = x.shape[dim]
    padded = length + (-length) % block
    if padded != signs.numel():
        raise ConfigError(f"need {padded} signs for length {length} and block {block}, got {signs.numel()}")
    if padded != length:
        x = torch.nn.functional.pad(x, (0, 0) * (x.ndim - dim - 1) + (0, padded - length))
    shape = x.shape
    blocks = x.reshape(*shape[:dim], padded // block, block, -1)
    signed = blocks * signs.reshape(padded // block, block, 1)
    return (hadamard_matrix(block, x.device, x.dtype) @ signed).reshape(shape)
