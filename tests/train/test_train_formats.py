"""Number formats: every representable value, round trips, nearest rounding, saturation, zero,
and unbiased stochastic rounding."""

import pytest
import torch

from nibble.errors import ConfigError
from nibble.train.formats import (
    E2M1, E4M3, RADIX2, RADIX4_EVEN, RADIX4_ODD, float_levels, int_levels, log_levels, mx_scale, nv_scales,
    quantize_float, quantize_int, quantize_log, quantize_mxfp4, quantize_nvfp4, random_mantissa, round_to_integer,
)

LOG_FORMATS = {"radix4-even": RADIX4_EVEN, "radix4-odd": RADIX4_ODD, "radix2": RADIX2}


def brute_force_nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return levels[(x[:, None] - levels[None, :]).abs().argmin(1)]


def signed_levels(magnitudes: torch.Tensor) -> torch.Tensor:
    return torch.cat([-magnitudes.flip(0), magnitudes]).unique()


def assert_unbiased(draws: torch.Tensor, target: torch.Tensor, gap: torch.Tensor) -> None:
    """Mean over dim 0 within 5 standard errors of ``target`` (a Bernoulli draw on ``gap``)."""
    tolerance = 5 * gap / (2 * draws.shape[0] ** 0.5) + 1e-7
    assert ((draws.mean(0) - target).abs() <= tolerance).all()


# --- integers ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed,count", [(4, True, 15), (4, False, 16), (2, True, 3), (8, True, 255)])
def test_int_levels_and_round_trip(bits, signed, count):
    levels = int_levels(bits, signed, scale=0.37)
    assert levels.numel() == count and (levels.diff() > 0).all()
    assert torch.equal(quantize_int(levels, 0.37, bits, signed), levels)


@pytest.mark.parametrize("signed", [True, False])
def test_int_nearest_saturation_and_zero(signed):
    levels = int_levels(4, signed, scale=0.25)
    x = torch.randn(5000) * 2
    assert torch.equal(quantize_int(x, 0.25, 4, signed), brute_force_nearest(x, levels))
    big = torch.tensor([1e6, -1e6, 0.0])
    assert quantize_int(big, 0.25, 4, signed).tolist() == [levels.max(), levels.min(), 0.0]


def test_int_ties_go_to_even_and_errors():
    assert quantize_int(torch.tensor([0.5, 1.5, 2.5]), 1.0).tolist() == [0.0, 2.0, 2.0]
    with pytest.raises(ConfigError):
        quantize_int(torch.ones(2), 1.0, bits=1)
    with pytest.raises(ConfigError):
        round_to_integer(torch.ones(2), "truncate")


# --- logarithmic FP4 ---------------------------------------------------------------------

@pytest.mark.parametrize("name", LOG_FORMATS)
def test_log_levels(name):
    fmt = LOG_FORMATS[name]
    levels = log_levels(fmt)
    assert levels.numel() == 15  # 16 codes, +0 and -0 coincide
    magnitudes = levels[levels > 0]
    ratio = 4.0 if fmt.step == 2 else 2.0
    assert torch.allclose(magnitudes[1:] / magnitudes[:-1], torch.full((6,), ratio))
    assert magnitudes.max() == 2.0 ** fmt.top


@pytest.mark.parametrize("scale", [1.0, 0.375, 2.0 ** -20])
@pytest.mark.parametrize("name", LOG_FORMATS)
def test_log_round_trip_nearest_saturation_zero(name, scale):
    fmt = LOG_FORMATS[name]
    levels = log_levels(fmt, scale)
    assert torch.equal(quantize_log(levels, scale, fmt), levels)
    x = torch.randn(20000) * scale * torch.logspace(-5, 0, 20000)  # many orders of magnitude
    assert torch.equal(quantize_log(x, scale, fmt), brute_force_nearest(x, levels))
    top = levels.max()
    special = torch.tensor([100.0, -100.0, 0.0, 1e-30]) * scale
    assert quantize_log(special, scale, fmt).tolist() == [top, -top, 0.0, 0.0]


def brute_force_nearest_log(x: torch.Tensor, fmt) -> torch.Tensor:
    """Nearest level in log2 (ties up) at or above the smallest level; linear nearest below it."""
    exponents = torch.tensor(fmt.exponents, dtype=torch.float64).sort().values
    v = x.abs().double()
    distance = (torch.log2(v)[:, None] - exponents[None, :]).abs()
    pick = (distance - torch.arange(len(exponents)) * 1e-9).argmin(1)  # ties to the larger level
    magnitude = torch.exp2(exponents[pick])
    bottom = 2.0 ** fmt.bottom
    magnitude = torch.where(v < bottom, torch.where(v >= bottom / 2, bottom, 0.0), magnitude)
    return magnitude.copysign(x.double()).float()


@pytest.mark.parametrize("name", LOG_FORMATS)
def test_log_nearest_in_log_domain_against_brute_force(name):
    fmt = LOG_FORMATS[name]
    x = torch.randn(20000) * torch.logspace(-5, 0.5, 20000)
    assert torch.equal(quantize_log(x, 1.0, fmt, "nearest-log"), brute_force_nearest_log(x, fmt))
    levels = log_levels(fmt)
    assert torch.equal(quantize_log(levels, 1.0, fmt, "nearest-log"), levels)


def test_log_nearest_in_log_domain_moves_the_midpoints():
    # radix 4 even, neighbours 1/4 and 1: linear midpoint 0.625, geometric midpoint 0.5
    x = torch.tensor([0.49, 0.5, 0.6])
    assert quantize_log(x, 1.0, RADIX4_EVEN, "nearest").tolist() == [0.25, 0.25, 0.25]
    assert quantize_log(x, 1.0, RADIX4_EVEN, "nearest-log").tolist() == [0.25, 1.0, 1.0]
    # radix 2, neighbours 1/2 and 1: geometric midpoint 1/sqrt(2) = 0.7071
    assert quantize_log(torch.tensor([0.7071, 0.7072]), 1.0, RADIX2, "nearest-log").tolist() == [0.5, 1.0]
    # the two radix-4 phases round every value in opposite directions (in log2: one down, one up)
    g = torch.rand(10000) * 0.9 + 0.01
    even = quantize_log(g, 1.0, RADIX4_EVEN, "nearest-log")
    odd = quantize_log(g, 1.0, RADIX4_ODD, "nearest-log")
    assert torch.all((even - g) * (odd - g) <= 0)


def test_nearest_log_is_only_for_log_formats():
    with pytest.raises(ConfigError, match="nearest-log"):
        quantize_int(torch.ones(3), 1.0, rounding="nearest-log")


def test_log_ties_go_away_from_zero():
    # radix 2: 0.75 is the midpoint of 0.5 and 1
    assert quantize_log(torch.tensor([0.75, -0.75]), 1.0, RADIX2).tolist() == [1.0, -1.0]
    # radix 4 even: 0.625 is the midpoint of 0.25 and 1
    assert quantize_log(torch.tensor([0.625]), 1.0, RADIX4_EVEN).tolist() == [1.0]


# --- minifloats --------------------------------------------------------------------------

def test_e2m1_levels():
    assert float_levels(E2M1).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e4m3_levels_match_torch_float8():
    levels = float_levels(E4M3)
    assert levels.numel() == 127 and levels.max() == 448 and levels[1] == 2.0 ** -9
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[codes.isfinite() & (codes >= 0)].unique()
    assert torch.equal(finite, levels)


@pytest.mark.parametrize("fmt", [E2M1, E4M3], ids=lambda f: f.name)
def test_minifloat_round_trip_nearest_saturation_zero(fmt):
    levels = signed_levels(float_levels(fmt))
    assert torch.equal(quantize_float(levels, fmt), levels)
    x = torch.randn(20000) * fmt.max_value / 3
    nearest = brute_force_nearest(x, levels)
    assert torch.equal((x - quantize_float(x, fmt)).abs(), (x - nearest).abs())  # a nearest value (ties below)
    special = torch.tensor([1e9, -1e9, 0.0, 1e-30])
    assert quantize_float(special, fmt).tolist() == [fmt.max_value, -fmt.max_value, 0.0, 0.0]


def test_minifloat_ties_go_to_even_mantissa():
    assert quantize_float(torch.tensor([2.5, 3.5, 5.0, 0.25, 0.75]), E2M1).tolist() == [2.0, 4.0, 4.0, 0.0, 1.0]
    x = torch.randn(50000) * 50
    assert torch.equal(quantize_float(x, E4M3), x.to(torch.float8_e4m3fn).float())


# --- block formats -----------------------------------------------------------------------

def test_mx_scale_rules():
    amax = torch.tensor([6.0, 7.9, 8.0, 0.3])
    assert mx_scale(amax).tolist() == [1.0, 1.0, 2.0, 2.0 ** -4]  # OCP: the max may saturate
    assert mx_scale(amax, clip_free=True).tolist() == [1.0, 2.0, 2.0, 2.0 ** -4]


def test_mxfp4_round_trip_and_grid():
    e2m1 = signed_levels(float_levels(E2M1))
    blocks = e2m1[torch.randint(0, e2m1.numel(), (6, 64))]
    blocks[:, 0], blocks[:, 32] = 6.0, -6.0  # each block's max maps onto 6·scale
    exact = blocks * 2.0 ** torch.randint(-5, 5, (6, 1)).float()
    assert torch.equal(quantize_mxfp4(exact, dim=1), exact)
    x = torch.randn(64, 48) * torch.logspace(-3, 3, 64)[:, None]
    q = quantize_mxfp4(x, dim=0)  # blocks run down the columns; 64 rows = 2 blocks
    for block in (slice(0, 32), slice(32, 64)):
        scale = mx_scale(x[block].abs().amax(0))
        units = q[block] / scale
        assert torch.isin(units, e2m1).all()
        assert torch.equal(q[block], quantize_float(x[block] / scale, E2M1) * scale)


def test_mxfp4_pads_short_blocks_and_keeps_zero():
    x = torch.randn(3, 40, 5)
    q = quantize_mxfp4(x, dim=1)
    assert q.shape == x.shape
    assert torch.equal(q[:, 32:], quantize_mxfp4(x[:, 32:], dim=1))  # the 8-long tail is its own block
    assert torch.equal(quantize_mxfp4(torch.zeros(2, 32)), torch.zeros(2, 32))


def test_nvfp4_grid_round_trip_and_zero():
    e2m1 = signed_levels(float_levels(E2M1))
    x = torch.randn(8, 64) * torch.logspace(-2, 2, 8)[:, None]
    q = quantize_nvfp4(x, dim=1)
    blocks = x.reshape(8, 4, 16)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = nv_scales(amax, x.abs().amax())
    assert ((scale - amax / 6).abs() <= amax / 6 / 16).all()  # E4M3 keeps 3 mantissa bits
    units = q.reshape(8, 4, 16) / scale
    assert torch.isclose(units[..., None], e2m1, rtol=1e-6, atol=0).any(-1).all()
    # values already on the grid with an exactly representable block scale come back unchanged
    exact = e2m1[torch.randint(0, e2m1.numel(), (4, 16))]
    exact[:, 0] = 6.0
    exact = exact * 2.0 ** -10 * 448
    assert torch.equal(quantize_nvfp4(exact), exact)
    assert torch.equal(quantize_nvfp4(torch.zeros(3, 16)), torch.zeros(3, 16))


# --- stochastic rounding -----------------------------------------------------------------

def test_random_mantissa_is_uniform_on_23_bits():
    r = random_mantissa((200000,))
    assert r.dtype == torch.int32 and r.min() >= 0 and r.max() < 2 ** 23
    assert abs(r.double().mean().item() / 2 ** 23 - 0.5) < 0.005


DRAWS = 4000


def _repeat(x: torch.Tensor) -> torch.Tensor:
    return x.expand(DRAWS, *x.shape).contiguous()


def test_stochastic_int_is_unbiased():
    x = torch.linspace(-9, 9, 101)  # includes saturated values outside ±7
    draws = quantize_int(_repeat(x), 1.0, 4, rounding="stochastic")
    assert_unbiased(draws, x.clamp(-7, 7), torch.ones(()))
    assert (draws - x.clamp(-7, 7)).abs().max() < 1


@pytest.mark.parametrize("name", LOG_FORMATS)
def test_stochastic_log_is_unbiased_and_lands_on_neighbours(name):
    fmt = LOG_FORMATS[name]
    levels = log_levels(fmt)
    top = levels.max()
    x = torch.cat([torch.linspace(-top, top, 61), torch.tensor([1e-5, -3e-5, 0.0])])
    draws = quantize_log(_repeat(x), 1.0, fmt, "stochastic")
    index = torch.searchsorted(levels, x).clamp(1, levels.numel() - 1)
    lower, upper = levels[index - 1], levels[index]
    assert ((draws == lower) | (draws == upper) | (draws == x)).all()
    assert_unbiased(draws, x, upper - lower)


@pytest.mark.parametrize("fmt", [E2M1, E4M3], ids=lambda f: f.name)
def test_stochastic_minifloat_is_unbiased(fmt):
    levels = signed_levels(float_levels(fmt))
    x = torch.linspace(-fmt.max_value, fmt.max_value, 77)
    draws = quantize_float(_repeat(x), fmt, "stochastic")
    index = torch.searchsorted(levels, x).clamp(1, levels.numel() - 1)
    assert_unbiased(draws, x, levels[index] - levels[index - 1])


def test_stochastic_block_formats_are_unbiased():
    x = torch.randn(1, 32) * 3
    draws = quantize_mxfp4(_repeat(x[0]).view(DRAWS, 32), dim=1, rounding="stochastic", clip_free=True)
    scale = mx_scale(x.abs().amax(), clip_free=True)
    assert_unbiased(draws, x[0], scale * 2)  # the widest E2M1 gap is 2 units
    y = torch.randn(16) * 2.0 ** -10 * 448
    y[0] = 6 * 2.0 ** -10 * 448  # block scale exactly 448 units of the tensor scale 2^-10
    draws = quantize_nvfp4(_repeat(y), dim=1, rounding="stochastic")
    assert_unbiased(draws, y, torch.full((), 2 * 448 * 2.0 ** -10))
