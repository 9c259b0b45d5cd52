"""Triton kernels against the reference: on CUDA when there is one, and in triton's interpreter
on the CPU when triton is installed (both skip cleanly otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nibble.kernels import aqlm_linear, scalar_linear, use_backend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
AQLM_CONFIGS = [(1, 16), (2, 8)]
SHAPES = [(1, 8), (13, 40), (100, 264), (4096, 4096)]  # (out, in); odd tiles on purpose
BATCHES = [1, 2, 3, 4, 5, 6, 7, 8]


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("config", AQLM_CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_aqlm_on_cuda(data, config, shape, dtype):
    layer = data.make_aqlm(*shape, *config, device="cuda")
    for batch in BATCHES:
        x = torch.randn(batch, shape[1], device="cuda").to(dtype)
        with use_backend("triton"):
            actual = aqlm_linear(x, *layer)
        with use_backend("reference"):
            expected = aqlm_linear(x.float(), *layer).to(dtype)
        data.assert_close(actual, expected, dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("shape", [(13, 128), (100, 256), (4096, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_scalar_on_cuda(data, bits, shape, dtype):
    for group_size, symmetric in [(32, False), (128, True)]:
        packed, scales, zeros, bias = data.make_scalar(*shape, bits, group_size, symmetric, device="cuda")
        for batch in BATCHES:
            x = torch.randn(batch, shape[1], device="cuda").to(dtype)
            with use_backend("triton"):
                actual = scalar_linear(x, packed, scales, zeros, bits, group_size, bias)
            with use_backend("reference"):
                expected = scalar_linear(x.float(), packed, scales, zeros, bits, group_size, bias).to(dtype)
            data.assert_close(actual, expected, dtype)


@pytest.mark.cuda
@needs_cuda
def test_cuda_small_batches_choose_triton(data):
    from nibble.kernels import aqlm_call, select

    layer = data.make_aqlm(64, 64, 2, 8, device="cuda")
    assert select(aqlm_call(torch.randn(1, 64, device="cuda"), *layer)).name == "triton"
    assert select(aqlm_call(torch.randn(64, 64, device="cuda"), *layer)).name == "reference"


INTERPRETED = textwrap.dedent("""
    import torch
    from nibble.kernels import reference
    from nibble.kernels.triton.aqlm import aqlm_linear
    from nibble.kernels.triton.scalar import scalar_linear
    from nibble.formats.aqlm import index_to_codes
    from nibble.formats.packing import pack_bits

    torch.manual_seed(0)
    worst = 0.0
    def check(actual, expected):
        global worst
        worst = max(worst, ((actual - expected).abs().max() / expected.abs().max()).item())
    for m, bits, out, inp, batch in [(2, 8, 13, 40, 1), (1, 16, 37, 264, 3), (2, 8, 20, 520, 8)]:
        codes = index_to_codes(torch.randint(0, 2**bits, (out, inp // 8, m)), bits)
        books, scales, bias = torch.randn(m, 2**bits, 8), torch.rand(out) + 0.5, torch.randn(out)
        x = torch.randn(batch, inp)
        check(aqlm_linear(x, codes, books, scales, bias), reference.aqlm_linear(x, codes, books, scales, bias))
    for bits, out, inp, group, batch in [(4, 13, 128, 32, 1), (2, 20, 256, 64, 5), (4, 7, 96, 8, 8)]:
        packed = pack_bits(torch.randint(0, 2**bits, (out, inp)), bits)
        scales, zeros = torch.rand(out, inp // group), torch.randint(0, 2**bits, (out, inp // group))
        x, bias = torch.randn(batch, inp), torch.randn(out)
        check(scalar_linear(x, packed, scales, zeros, bits, group, bias),
              reference.scalar_linear(x, packed, scales, zeros, bits, group, bias))
        check(scalar_linear(x, packed, scales, None, bits, group, None),
              reference.scalar_linear(x, packed, scales, None, bits, group, None))
    print("worst", worst)
    assert worst < 1e-5, worst
""")


@pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
def test_triton_kernels_in_the_interpreter():
    """The kernels' indexing and masking, run by triton's CPU interpreter (no GPU needed)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
