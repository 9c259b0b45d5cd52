"""Random AQLM and scalar layers for the kernel tests, and the tolerances per dtype."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nibble.formats.aqlm import index_to_codes
from nibble.formats.packing import pack_bits

# Largest |kernel - reference| allowed, relative to max |reference| (at least 1: a lone output
# near zero by cancellation keeps an absolute bound). Kernels compute in float32 like the
# reference, so fp16/bf16 outputs differ by about their rounding.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_aqlm(out: int, inp: int, num_codebooks: int, bits: int, group: int = 8, seed: int = 0, bias: bool = True,
              device: str = "cpu"):
    """codes, codebooks, scales, bias of a random AQLM layer (float16-representable values)."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 2**bits, (out, inp // group, num_codebooks), generator=gen)
    codes = index_to_codes(index, bits)
    codebooks = (torch.randn(num_codebooks, 2**bits, group, generator=gen) * 0.1).half().float()
    scales = (torch.rand(out, generator=gen) + 0.5).half().float()
    shift = torch.randn(out, generator=gen) if bias else None
    tensors = codes, codebooks, scales, shift
    return tuple(None if t is None else t.to(device) for t in tensors)


def make_scalar(out: int, inp: int, bits: int, group_size: int, symmetric: bool = False, seed: int = 0,
                bias: bool = True, device: str = "cpu"):
    """packed, scales, zeros, bias of a random scalar layer; input padded to 32 like the format."""
    gen = torch.Generator().manual_seed(seed)
    padded = -(-inp // 32) * 32
    q = torch.zeros(out, padded, dtype=torch.int64)
    q[:, :inp] = torch.randint(0, 2**bits, (out, inp), generator=gen)
    packed = pack_bits(q, bits)
    scales = (torch.rand(out, inp // group_size, generator=gen) * 0.1 + 0.01).half().float()
    zeros = None if symmetric else torch.randint(0, 2**bits, (out, inp // group_size), generator=gen).to(torch.uint8)
    shift = torch.randn(out, generator=gen) if bias else None
    tensors = packed, scales, zeros, shift
    return tuple(None if t is None else t.to(device) for t in tensors)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = (actual.float() - expected.float()).abs().max().item()
    scale = max(expected.float().abs().max().item(), 1.0)
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} vs max |reference| {scale:.3g}"


@pytest.fixture
def data() -> SimpleNamespace:
    """The helpers above: data.make_aqlm, data.make_scalar, data.assert_close."""
    return SimpleNamespace(make_aqlm=make_aqlm, make_scalar=make_scalar, assert_close=assert_close)


@pytest.fixture(scope="session")
def cpu_kernels() -> None:
    """Builds the C++ kernels once per session (cached per machine). A failed build fails the
    test, unless NIBBLE_CPU_KERNELS=0 asked for no build: then the test is skipped."""
    import os

    from nibble.kernels import cpu
    from nibble.kernels.cpu import build

    if os.environ.get("NIBBLE_CPU_KERNELS") == "0":
        pytest.skip("C++ kernels disabled by NIBBLE_CPU_KERNELS=0")
    if not cpu.available():
        pytest.fail(f"C++ kernels failed to build: {build.error()}")


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test draws the same inputs on every run."""
    torch.manual_seed(0)
