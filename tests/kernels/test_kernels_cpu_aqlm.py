"""CPU AQLM backends (C++ lookup tables, pure-torch lookup tables) against the reference."""

from __future__ import annotations

import pytest
import torch

from nibble.kernels import aqlm_linear, use_backend

CONFIGS = [(1, 8), (2, 8), (3, 8), (4, 8), (2, 6)]  # (codebooks, bits per codebook)
WIDE_CONFIGS = [(1, 16), (2, 12)]  # decoding only
SHAPES = [(1, 8), (13, 40), (64, 64), (100, 200), (300, 576)]  # (out, in); 40, 200 and 576 are not whole blocks
BATCHES = [1, 2, 3, 4, 5, 6, 7, 8, 11]


def reference(x, layer):
    with use_backend("reference"):
        return aqlm_linear(x, *layer)


@pytest.mark.parametrize("config", CONFIGS + WIDE_CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method", ["lut", "decode"])
def test_cpu_kernels_match_reference_across_batches(cpu_kernels, data, config, shape, method):
    from nibble.kernels import cpu

    if method == "lut" and config in WIDE_CONFIGS:
        pytest.skip("lookup tables take at most 256 codewords")
    layer = data.make_aqlm(*shape, *config)
    for batch in BATCHES:
        x = torch.randn(batch, shape[1])
        data.assert_close(cpu.aqlm_lut_linear(x, *layer, method=method), reference(x, layer), torch.float32)


@pytest.mark.parametrize("config", CONFIGS + WIDE_CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}")
def test_cpu_lut_backend_picks_a_method_by_rows(cpu_kernels, data, config):
    for shape in [(16, 72), (1300, 40)]:  # decoding below 320·M rows, tables above
        layer = data.make_aqlm(*shape, *config)
        x = torch.randn(2, shape[1])
        with use_backend("cpu-lut"):
            data.assert_close(aqlm_linear(x, *layer), reference(x, layer), torch.float32)


def test_lookup_tables_refuse_wide_codebooks(cpu_kernels, data):
    from nibble.kernels import cpu

    layer = data.make_aqlm(16, 64, 1, 16)
    with pytest.raises(RuntimeError, match="256 codewords"):
        cpu.aqlm_lut_linear(torch.randn(1, 64), *layer, method="lut")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu-lut", "torch-lut"])
def test_dtypes_leading_dims_and_no_bias(cpu_kernels, data, dtype, backend):
    layer = data.make_aqlm(48, 96, 2, 8, bias=False)
    for shape in [(96,), (1, 96), (2, 3, 96)]:
        x = torch.randn(shape).to(dtype)
        with use_backend(backend):
            actual = aqlm_linear(x, *layer)
        data.assert_close(actual, reference(x, layer), dtype)


@pytest.mark.parametrize("config", [(1, 8), (2, 8), (4, 8)], ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_torch_lut_fallback_matches_reference(data, config, batch):
    layer = data.make_aqlm(70, 136, *config)
    x = torch.randn(batch, 136)
    with use_backend("torch-lut"):
        actual = aqlm_linear(x, *layer)
    data.assert_close(actual, reference(x, layer), torch.float32)


@pytest.mark.parametrize("method", ["lut", "decode"])
def test_large_input_splits_blocks_over_threads(cpu_kernels, data, method):
    # 4096 inputs = 64 code blocks: threads take blocks in turn and their partial sums are added.
    from nibble.kernels import cpu

    layer = data.make_aqlm(40, 4096, 2, 8)
    for batch in (1, 8):
        x = torch.randn(batch, 4096)
        data.assert_close(cpu.aqlm_lut_linear(x, *layer, method=method), reference(x, layer), torch.float32)


def test_in_place_code_update_is_seen(cpu_kernels, data):
    codes, codebooks, scales, bias = data.make_aqlm(32, 64, 2, 8)
    x = torch.randn(1, 64)
    with use_backend("cpu-lut"):
        before = aqlm_linear(x, codes, codebooks, scales, bias)
        codes.copy_(torch.randint(0, 256, codes.shape, dtype=torch.uint8))
        codebooks.mul_(2)
        after = aqlm_linear(x, codes, codebooks, scales, bias)
    assert not torch.allclose(before, after)
    data.assert_close(after, reference(x, (codes, codebooks, scales, bias)), torch.float32)
