"""CPU scalar 4/2-bit backend against the reference."""

from __future__ import annotations

import pytest
import torch

from nibble.kernels import scalar_linear, use_backend

SHAPES = [(1, 32), (13, 96), (64, 256), (100, 200)]  # (out, in); 96 and 200 are not multiples of 32
BATCHES = [1, 2, 3, 4, 5, 6, 7, 8, 11]


def reference(x, layer, bits, group_size):
    packed, scales, zeros, bias = layer
    with use_backend("reference"):
        return scalar_linear(x, packed, scales, zeros, bits, group_size, bias)


def group_sizes(inp: int, bits: int) -> list[int]:
    step = 32 // bits
    return [g for g in (step, 32, 64, inp) if inp % g == 0 and g % step == 0]


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_cpu_scalar_matches_reference(cpu_kernels, data, bits, shape, symmetric):
    for group_size in group_sizes(shape[1], bits):
        layer = data.make_scalar(*shape, bits, group_size, symmetric)
        packed, scales, zeros, bias = layer
        for batch in BATCHES:
            x = torch.randn(batch, shape[1])
            with use_backend("cpu-scalar"):
                actual = scalar_linear(x, packed, scales, zeros, bits, group_size, bias)
            data.assert_close(actual, reference(x, layer, bits, group_size), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_leading_dims(cpu_kernels, data, dtype):
    layer = data.make_scalar(40, 128, 4, 32, bias=False)
    packed, scales, zeros, _ = layer
    for shape in [(128,), (2, 3, 128)]:
        x = torch.randn(shape).to(dtype)
        with use_backend("cpu-scalar"):
            actual = scalar_linear(x, packed, scales, zeros, 4, 32)
        data.assert_close(actual, reference(x, layer, 4, 32), dtype)


def test_reference_matches_the_format_module(data):
    from nibble.formats.scalar import ScalarQuantLinear

    q = torch.randint(0, 16, (24, 64))
    scales = torch.rand(24, 2) + 0.1
    zeros = torch.randint(0, 16, (24, 2))
    layer = ScalarQuantLinear.from_integers(q, scales, zeros, 4, 32, symmetric=False, bias=None)
    x = torch.randn(3, 64)
    with use_backend("reference"):
        actual = scalar_linear(x, layer.qweight, layer.scales, layer.zeros, 4, 32)
    data.assert_close(actual, x @ layer.dequantize().T, torch.float32)
