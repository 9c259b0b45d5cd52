"""The AQLM C entry points of the decode runtime (``nibble.kernels.cpu.ckernel``) against the reference."""

from __future__ import annotations

import ctypes

import pytest
import torch
from runtime.runtime_models import hf_logits, make_llama
from torch import nn

from nibble.formats.aqlm import AQLMLinear
from nibble.kernels import aqlm_linear, use_backend
from nibble.kernels.cpu.ckernel import aqlm_ckernel
from nibble.runtime import build_runtime, native
from nibble.runtime.linears import prepare_linear

CONFIGS = [(1, 8), (2, 8), (3, 8), (4, 8), (2, 6)]  # (codebooks, bits per codebook)
SHAPES = [(13, 40), (64, 64), (300, 576), (1400, 72)]  # (out, in); 40, 576 and 72 are not whole blocks of 8
# groups; 1400 rows take lookup tables for every config, the others decode (aqlm_decode_preferred)


@pytest.fixture(scope="module")
def compiler():
    if not native.available():
        pytest.skip("no C++ compiler for the decode runtime")


def call_split(kernel, x: torch.Tensor, out_features: int, parts: int) -> torch.Tensor:
    """``parts`` calls of ``split`` into their own buffers, then their sum, as the decode step does."""
    split = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 2, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                             *[ctypes.c_int64] * 3)(kernel.split)
    partials = torch.full((parts, x.shape[0], out_features), float("nan"))
    for part in range(parts):
        split(kernel.context, x.data_ptr(), x.stride(0), x.shape[0], partials[part].data_ptr(), out_features,
              part, parts)
    return partials.sum(0)


def call_kernel(kernel, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """prepare in its parts, then compute over ranges of ``kernel.chunk`` rows, as the decode step does."""
    prepare = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(kernel.prepare)
    compute = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 2, ctypes.c_int64, *[ctypes.c_void_p] * 2,
                               *[ctypes.c_int64] * 4)(kernel.compute)
    rows = x.shape[0]
    workspace = torch.zeros(kernel.workspace_per_row * rows)
    y = torch.full((rows, out_features), float("nan"))
    for part in range(kernel.prepare_parts):
        prepare(kernel.context, x.data_ptr(), x.stride(0), rows, workspace.data_ptr(), part, kernel.prepare_parts)
    for begin in range(0, out_features, kernel.chunk):
        end = min(out_features, begin + kernel.chunk)
        compute(kernel.context, x.data_ptr(), x.stride(0), workspace.data_ptr(), y.data_ptr(), y.stride(0), rows,
                begin, end)
    return y


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("parts", [1, 2, 5, 7])
def test_c_entry_points_match_reference(compiler, data, config, shape, rows, parts):
    layer = data.make_aqlm(*shape, *config, bias=rows == 3)
    kernel = aqlm_ckernel(*layer)
    x = torch.randn(rows, shape[1])
    with use_backend("reference"):
        expected = aqlm_linear(x, *layer)
    data.assert_close(call_split(kernel, x, shape[0], parts), expected, torch.float32)


def test_aqlm_entry_points_split_by_inputs(compiler, data):
    kernel = aqlm_ckernel(*data.make_aqlm(64, 576, 2, 8))
    assert kernel.split is not None and kernel.compute is None and kernel.split_parts == 16


def test_wide_codebooks_have_no_c_entry_points(compiler, data):
    assert aqlm_ckernel(*data.make_aqlm(16, 64, 1, 16)) is None


def random_aqlm(linear: nn.Linear, num_codebooks: int, seed: int) -> AQLMLinear:
    gen = torch.Generator().manual_seed(seed)
    groups = linear.in_features // 8
    codes = torch.randint(0, 256, (linear.out_features, groups, num_codebooks), generator=gen).to(torch.uint8)
    codebooks = torch.randn(num_codebooks, 256, 8, generator=gen) * 0.05
    scales = torch.rand(linear.out_features, generator=gen) + 0.5
    bias = None if linear.bias is None else linear.bias.detach()
    return AQLMLinear(linear.in_features, linear.out_features, num_codebooks, 8, 8, bias, codes, codebooks, scales)


@pytest.mark.parametrize("variant", ["gqa-tied", "mha-bias-untied"])
@pytest.mark.parametrize("threads", [1, 2])  # down_proj (128 inputs, 2 code blocks) runs in 2 parts on 2 threads
def test_cpp_decode_step_with_aqlm_layers_matches_the_model(compiler, variant, threads):
    model = make_llama(variant)
    for index, (name, module) in enumerate(list(model.model.named_modules())):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.model.get_submodule(parent), child, random_aqlm(module, 1 + index % 3, index))
    assert prepare_linear(model.model.layers[0].mlp.down_proj).ckernel is not None
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    reference = hf_logits(model, tokens)
    runtime = build_runtime(model, max_len=8, batch_size=2, backend="cpp", threads=threads)
    runtime.start()
    runtime.feed(tokens[:, :5])
    torch.testing.assert_close(runtime.feed(tokens[:, 5]), reference[:, 5], atol=1e-4, rtol=0)


def random_scalar(out_features: int, in_features: int, group_size: int, symmetric: bool, bias: bool, bits: int = 8):
    from nibble.quantize.rtn import RTNConfig, RTNQuantizer

    linear = nn.Linear(in_features, out_features, bias=bias)
    config = RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    return RTNQuantizer(config).quantize_layer("layer", linear, None)


def assert_within_x_rounding(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias) -> None:
    """The scalar kernels round x to 14-bit integers (scale max|x|/8191 per row): each output may
    differ from the float result by at most half a step times sum_i |W[o, i]| (plus float error)."""
    expected = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    step = x.abs().amax(-1, keepdim=True).double() / 8191
    bound = 0.5 * step * weight.abs().sum(1).double() + 2e-5 * expected.abs().max()
    assert got.shape == expected.shape
    assert ((got.double() - expected).abs() <= bound).all()
    assert (got.double() - expected).abs().max() > 0  # x really is rounded: not the float path


@pytest.mark.parametrize("bits,group_size", [(8, 8), (8, 64), (8, -1), (4, 32), (4, 64), (4, -1)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("rows", [1, 3])
def test_scalar_entry_points_match_the_dequantized_weight(compiler, data, bits, group_size, symmetric, rows):
    layer = random_scalar(200, 192, group_size, symmetric, bias=rows == 3, bits=bits)
    x = torch.randn(rows, 192)
    assert_within_x_rounding(call_kernel(layer.runtime_ckernel(), x, 200), x, layer.dequantize(), layer.bias)


@pytest.mark.parametrize("bits", [8, 4])
def test_scalar_entry_points_flush_long_rows(compiler, bits):
    """9,024 inputs: more than 256 vpmaddwd steps, so the int32 partial sums are flushed."""
    layer = random_scalar(16, 9024, -1, False, bias=False, bits=bits)
    x = torch.randn(2, 9024) + 3.0  # same-sign inputs: the sums grow as fast as they can
    assert_within_x_rounding(call_kernel(layer.runtime_ckernel(), x, 16), x, layer.dequantize(), None)


def test_scalar_entry_points_need_whole_groups_and_8_or_4_bits(compiler):
    assert random_scalar(16, 36, 12, False, False).runtime_ckernel() is None  # 8 bits, groups of 12
    assert random_scalar(8, 64, 16, False, False, bits=4).runtime_ckernel() is None  # 4 bits, groups of 16
    assert random_scalar(8, 96, 64, False, False, bits=4).runtime_ckernel() is None  # 64 does not divide 96
    assert random_scalar(8, 64, 32, False, False, bits=2).runtime_ckernel() is None


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(3, 192), (2, 5, 192)])
def test_scalar_runtime_linear_matches_the_dequantized_weight(compiler, data, bits, shape):
    layer = random_scalar(200, 192, 64, symmetric=False, bias=True, bits=bits)
    x = torch.randn(shape)
    assert_within_x_rounding(layer.runtime_linear()(x), x, layer.dequantize(), layer.bias)
