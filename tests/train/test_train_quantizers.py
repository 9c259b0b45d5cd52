"""SAWB, PACT, GradScale, two-phase rounding and the random Hadamard transform."""

import math

import pytest
import torch

from nibble.errors import ConfigError
from nibble.train.formats import RADIX2, RADIX4_EVEN, RADIX4_ODD, int_levels, quantize_int, quantize_log
from nibble.train.quantizers import (
    SAWB_COEFFICIENTS, dither_gain, fit_sawb_coefficients, grad_scale, hadamard_matrix, init_pact_alpha,
    interleaved_two_phase_round, mse_optimal_clip, pact_clip, quantize_activation_pact, quantize_grad_log,
    quantize_weight_sawb, random_hadamard, random_signs, sawb_clip, two_phase_round,
)

SAMPLES = {
    "normal": lambda n: torch.randn(n),
    "laplace": lambda n: torch.distributions.Laplace(0.0, 1.0).sample((n,)),
    "uniform": lambda n: torch.rand(n) * 2 - 1,
}


def int4_mse(x: torch.Tensor, alpha: float) -> float:
    return float((quantize_int(x, alpha / 7, 4) - x).pow(2).mean())


# --- SAWB ----------------------------------------------------------------------------------

def test_sawb_table_matches_a_fresh_fit():
    c1, c2 = fit_sawb_coefficients(4, count=2 ** 14, seed=1)
    table_c1, table_c2 = SAWB_COEFFICIENTS[4]
    for ratio in (0.707, 0.798, 0.866):  # E|w| / sqrt(E w²) of Laplace, normal, uniform
        assert table_c1 - table_c2 * ratio == pytest.approx(c1 - c2 * ratio, rel=0.05)


@pytest.mark.parametrize("name,versus_max", [("normal", 0.5), ("laplace", 0.3), ("uniform", 1.0)])
def test_sawb_clip_is_close_to_mse_optimal(name, versus_max):
    w = SAMPLES[name](2 ** 16) * 0.02
    alpha = float(sawb_clip(w, 4))
    assert int4_mse(w, alpha) <= 1.1 * int4_mse(w, mse_optimal_clip(w, 4))
    assert int4_mse(w, alpha) <= versus_max * int4_mse(w, float(w.abs().max()))  # vs. scaling by the max


def test_sawb_weights_use_fifteen_symmetric_levels():
    w = torch.randn(64, 64)
    q = quantize_weight_sawb(w)
    step = sawb_clip(w) / 7
    assert torch.isclose(q.unique()[:, None], int_levels(4, True) * step).any(1).all()
    assert q.unique().numel() <= 15
    with pytest.raises(ConfigError):
        sawb_clip(w, bits=6)


# --- PACT ----------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [False, True])
def test_pact_clip_gradients(signed):
    x = torch.randn(500, requires_grad=True)
    alpha = torch.tensor(0.8, requires_grad=True)
    upstream = torch.randn(500)
    y = pact_clip(x, alpha, signed)
    (y * upstream).sum().backward()
    low = -0.8 if signed else 0.0
    assert torch.equal(y, x.detach().clamp(low, 0.8))
    inside = (x > low) & (x < 0.8)
    assert torch.equal(x.grad, upstream * inside)
    expected = upstream[x >= 0.8].sum() - (upstream[x <= -0.8].sum() if signed else 0.0)
    assert alpha.grad == pytest.approx(float(expected), abs=1e-5)


def test_pact_quantizer_grid_and_init():
    x = torch.relu(torch.randn(4000)) * 3
    alpha = init_pact_alpha(x, 4, signed=False)
    assert 0 < alpha < float(x.max())
    clipped = x.clamp(0, alpha)
    q = quantize_activation_pact(clipped, torch.tensor(alpha), 4, signed=False)
    assert q.unique().numel() <= 16 and q.min() >= 0 and q.max() <= alpha + 1e-6
    error = float((q - x).pow(2).mean())
    full_range = float((quantize_int(x, float(x.max()) / 15, 4, signed=False) - x).pow(2).mean())
    assert error < full_range


# --- GradScale and two-phase rounding ------------------------------------------------------

def test_grad_scale_is_the_power_of_two_above_the_max():
    for amax in (3.0, 4.0, 1e-7, 123.4):
        g = torch.tensor([amax, -amax / 3, 0.0])
        scale = float(grad_scale(g))
        assert math.log2(scale).is_integer() and 0.5 < amax / scale <= 1.0
    assert float(grad_scale(torch.zeros(4))) == 1.0


@pytest.mark.parametrize("dim", [0, 1])
def test_grad_scale_per_slice_is_each_slice_own_scale(dim: int):
    g = torch.randn(5, 7) * torch.logspace(-4, 2, 5)[:, None]
    g[2] = 0.0
    g[:, 3] = 0.0
    scales = grad_scale(g, dim)
    assert scales.shape == (g.shape[0] if dim else 1, 1 if dim else g.shape[1])
    for i, row in enumerate(g.unbind(1 - dim)):
        assert scales.flatten()[i] == grad_scale(row)


def test_two_phase_rounding_lands_on_even_and_odd_exponents():
    g = torch.randn(20000) * torch.logspace(-3, 0, 20000)  # mostly within the 2^12 range
    even, odd = two_phase_round(g)
    scale = grad_scale(g)
    for copy, parity in ((even, 0), (odd, 1)):
        nonzero = copy[copy != 0].abs() / scale
        exponents = torch.log2(nonzero)
        assert torch.equal(exponents, exponents.round())
        assert (exponents.long().remainder(2) == parity).all()
        assert copy.count_nonzero() > 0.75 * g.numel()
    assert torch.equal(torch.sign(even[even != 0]), torch.sign(g[even != 0]))


def test_two_phase_errors_partly_cancel():
    g = torch.randn(50000)
    even, odd = two_phase_round(g)
    mse = lambda q: float((q - g).pow(2).mean())  # noqa: E731
    assert mse((even + odd) / 2) < 0.8 * min(mse(even), mse(odd))


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("first", [RADIX4_EVEN, RADIX4_ODD])
def test_interleaved_two_phase_alternates_the_phase_along_the_reduction(dim, first):
    g = torch.randn(7, 9) * torch.logspace(-3, 0, 63).view(7, 9)
    q = interleaved_two_phase_round(g, dim, first)
    scale = grad_scale(g)  # one GradScale for both phases
    second = RADIX4_ODD if first == RADIX4_EVEN else RADIX4_EVEN
    for index in range(g.shape[dim]):
        fmt = first if index % 2 == 0 else second
        assert torch.equal(q.select(dim, index), quantize_log(g.select(dim, index), scale, fmt))


def test_interleaved_phases_cancel_the_coherent_error_of_a_sum():
    # one feature's gradient over many tokens, all of about the same size: round-to-nearest gives
    # every term the same error; alternating the phase along the sum averages two different errors
    g = (2.3 + 0.01 * torch.randn(4096, 1)) * 2.0 ** -5
    exact = float(g.sum())
    one_phase = float(quantize_grad_log(g, RADIX4_EVEN).sum())
    interleaved = float(interleaved_two_phase_round(g, 0).sum())
    assert abs(one_phase - exact) > 0.5 * exact  # 2.3 rounds down to 1 on the even grid
    assert abs(interleaved - exact) < 0.35 * exact  # half the terms round to 2 on the odd grid


def test_block_grad_scale_fits_each_block():
    # blocks of 4 along dim 1 whose sizes differ by 2^20: one per-tensor GradScale flushes the small
    # block to zero, a GradScale per block keeps it at the same relative precision as the large one
    g = torch.cat([torch.randn(3, 4), 2.0 ** -20 * torch.randn(3, 4)], dim=1)
    assert quantize_grad_log(g, RADIX4_EVEN)[:, 4:].count_nonzero() == 0
    q = quantize_grad_log(g, RADIX4_EVEN, dim=1, block=4)
    for row in range(3):
        for block in (slice(0, 4), slice(4, 8)):
            part = g[row, block]
            assert torch.equal(q[row, block], quantize_log(part, grad_scale(part), RADIX4_EVEN))
    with pytest.raises(ConfigError, match="dimension"):
        quantize_grad_log(g, RADIX4_EVEN, block=4)


def test_dithered_grad_scale_gives_every_value_the_same_expected_gain():
    # round-to-nearest on the radix-4 grid: the gain (rounded / value) depends on where the value
    # falls between two levels (1.9 -> 1: 0.53; 3.1 -> 4: 1.29); a random shift of the scale by up
    # to one grid period makes the expected gain the same for all (1.2 / ln 4 for linear nearest)
    torch.manual_seed(0)
    values = torch.tensor([1.0, 1.3, 1.9, 2.4, 3.1])
    g = torch.cat([torch.tensor([4.0]), values]).expand(20000, 6) * 2.0 ** -4  # 4 fixes the GradScale
    gains_nearest = quantize_grad_log(g[:1], RADIX4_EVEN)[0, 1:] / g[0, 1:]
    gains = quantize_grad_log(g, RADIX4_EVEN, dim=1, dither=True)[:, 1:].mean(0) / g[0, 1:]  # a draw per row
    assert float(gains_nearest.max() - gains_nearest.min()) > 0.8
    assert torch.allclose(gains, torch.full_like(gains, 1.2 / math.log(4)), rtol=0.015)
    # divided by that gain, the dithered gradient is unbiased for every value
    torch.manual_seed(0)
    unbiased = quantize_grad_log(g, RADIX4_EVEN, dim=1, dither=True, debias=True)[:, 1:].mean(0) / g[0, 1:]
    assert torch.allclose(unbiased, torch.ones_like(unbiased), rtol=0.015)
    for options in (dict(), dict(dither=True, rounding="stochastic")):
        with pytest.raises(ConfigError, match="dither"):
            quantize_grad_log(g, RADIX4_EVEN, debias=True, **options)


@pytest.mark.parametrize("fmt, expected", [(RADIX4_EVEN, 1.2 / math.log(4)), (RADIX4_ODD, 1.2 / math.log(4)),
                                           (RADIX2, (2 / 3) / math.log(2))])
def test_dither_gain_is_the_mean_gain_of_nearest_rounding_over_one_grid_period(fmt, expected):
    assert dither_gain(fmt) == pytest.approx(expected, rel=1e-12)
    # numerically: the gain of a value at position t of the log-periodic grid, averaged over t
    positions = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000 * fmt.step
    values = torch.exp2(fmt.bottom + 2 * fmt.step + positions).float()  # away from both ends
    gains = quantize_log(values, 1.0, fmt) / values
    assert float(gains.double().mean()) == pytest.approx(expected, rel=1e-4)


def test_dithered_block_scales_put_each_block_on_its_own_shifted_grid():
    torch.manual_seed(1)
    g = torch.randn(5, 70)
    q = quantize_grad_log(g, RADIX4_EVEN, dim=1, block=32, dither=True)
    tops = []
    for row in range(5):
        for start in (0, 32, 64):
            part, got = g[row, start:start + 32], q[row, start:start + 32]
            top = got.abs().max()
            # one radix-4 grid per block: every nonzero magnitude is the top over a power of four
            steps = torch.log2(top / got[got != 0].abs()) / 2
            assert torch.allclose(steps, steps.round(), atol=1e-5)
            # the block maximum rounds to its nearest level: within (0.4, 1.6] of it
            assert 0.4 < float(top / part.abs().max()) <= 1.6
            tops.append(float(torch.log2(top)))
    # the scales are shifted off the powers of two, by a different amount per block
    fractions = torch.tensor(tops).remainder(2)
    assert fractions.std() > 0.2 and len(set(round(f, 4) for f in fractions.tolist())) == len(tops)


# --- random Hadamard transform -------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 16, 32])
def test_hadamard_matrix_is_orthonormal(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6)
    assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5))
    with pytest.raises(ConfigError):
        hadamard_matrix(12)


@pytest.mark.parametrize("rows", [64, 70])
def test_random_hadamard_keeps_the_weight_gradient_gemm(rows):
    g, x = torch.randn(rows, 8).double(), torch.randn(rows, 5).double()
    signs = random_signs(rows + (-rows) % 16).double()
    gh = random_hadamard(g, signs, 16, 0)
    xh = random_hadamard(x, signs, 16, 0)
    assert gh.shape[0] % 16 == 0
    assert torch.allclose(gh.T @ xh, g.T @ x)
    assert not torch.allclose(gh[:rows], g)


def test_random_hadamard_along_the_batch_of_conv_tensors():
    grad, x = torch.randn(32, 4, 6, 6).double(), torch.randn(32, 3, 6, 6).double()
    signs = random_signs(32).double()
    weight_grad = lambda a, b: torch.nn.grad.conv2d_weight(b, (4, 3, 3, 3), a, padding=1)  # noqa: E731
    rotated = weight_grad(random_hadamard(grad, signs, 16, 0), random_hadamard(x, signs, 16, 0))
    assert torch.allclose(rotated, weight_grad(grad, x))
    with pytest.raises(ConfigError):
        random_hadamard(x, signs[:16], 16, 0)
