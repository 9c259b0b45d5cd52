"""The AQLM storage format: code dtypes, decoding, bits, state dict, projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nibble.formats import FORMATS
from nibble.formats.aqlm import AQLMLinear, codes_to_index, dequantize_additive, index_to_codes



def make_layer(out_features=12, in_features=32, num_codebooks=2, nbits=8, group_size=8, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 2**nbits, (out_features, in_features // group_size, num_codebooks), generator=g)
    codebooks = (torch.randn(num_codebooks, 2**nbits, group_size, generator=g) * 0.3).half().float()
    scales = (torch.rand(out_features, generator=g) + 0.5).half().float()
    return AQLMLinear(in_features, out_features, num_codebooks, nbits, group_size,
                      bias=torch.randn(out_features, generator=g) if bias else None,
                      codes=index_to_codes(index, nbits), codebooks=codebooks, scales=scales), index


@pytest.mark.parametrize("nbits", [8, 9, 12, 15, 16])
def test_code_storage_round_trips_every_value(nbits):
    index = torch.arange(2**nbits)
    codes = index_to_codes(index, nbits)
    assert codes.dtype == (torch.uint8 if nbits <= 8 else torch.int16)
    assert torch.equal(codes_to_index(codes), index)


@pytest.mark.parametrize("num_codebooks,nbits,group_size", [(1, 8, 8), (2, 8, 8), (3, 8, 4), (1, 12, 8), (2, 9, 16)])
def test_dequantize_matches_the_definition(num_codebooks, nbits, group_size):
    layer, index = make_layer(num_codebooks=num_codebooks, nbits=nbits, group_size=group_size)
    weight = layer.dequantize()
    for o, j in [(0, 0), (5, 1), (11, 32 // group_size - 1)]:
        expected = layer.scales[o] * sum(layer.codebooks[m, index[o, j, m]] for m in range(num_codebooks))
        assert torch.allclose(weight[o, j * group_size:(j + 1) * group_size], expected, atol=1e-6)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(layer(x), F.linear(x, weight, layer.bias), atol=1e-6)
    assert layer.group_shape == (12, 32 // group_size)


def test_storage_bits_and_registry():
    layer, _ = make_layer(out_features=64, in_features=128, num_codebooks=2, nbits=8)
    bits = layer.storage_bits()
    assert bits == {"codes": 64 * 16 * 2 * 8, "codebooks": 2 * 256 * 8 * 16, "scales": 64 * 16}
    assert layer.bits_per_weight() == pytest.approx(sum(bits.values()) / (64 * 128))
    assert FORMATS["aqlm"] is AQLMLinear


def test_state_dict_is_float16_and_reloads_bit_exactly(tmp_path):
    from safetensors.torch import load_file, save_file

    layer, _ = make_layer(nbits=12)
    state = layer.state_dict()
    assert state["codes"].dtype == torch.int16
    assert state["codebooks"].dtype == torch.float16 and state["scales"].dtype == torch.float16
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "layer.safetensors"))
    clone = AQLMLinear.empty(layer.format_config())
    clone.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    assert clone.codebooks.dtype == torch.float32
    for name in ("codes", "codebooks", "scales", "bias"):
        assert torch.equal(getattr(clone, name), getattr(layer, name)), name
    assert torch.equal(clone.dequantize(), layer.dequantize())


def test_rounding_and_training_flags():
    layer, _ = make_layer()
    assert isinstance(layer.codebooks, torch.nn.Parameter) and not layer.codebooks.requires_grad
    with torch.no_grad():
        layer.codebooks.add_(1e-4)
    assert not torch.equal(layer.codebooks, layer.codebooks.half().float())
    layer.round_to_storage_()
    assert torch.equal(layer.codebooks, layer.codebooks.half().float())
    # the cached dense weight follows in-place changes
    before = layer.dequantize().clone()
    with torch.no_grad():
        layer.scales.mul_(2)
    assert torch.allclose(layer.dequantize(), 2 * before)
    # gradients reach codebooks and scales when a trainer asks for them
    layer.codebooks.requires_grad_(True)
    layer.scales.requires_grad_(True)
    layer(torch.randn(4, 32)).pow(2).sum().backward()
    assert layer.codebooks.grad is not None and layer.codebooks.grad.abs().sum() > 0
    assert layer.scales.grad is not None and layer.scales.grad.abs().sum() > 0


def test_shape_checks():
    with pytest.raises(ValueError, match="multiple"):
        AQLMLinear(30, 4, 1, 8, 8)
    with pytest.raises(ValueError, match="codes"):
        AQLMLinear(32, 4, 1, 8, 8, codes=torch.zeros(4, 4, 1, dtype=torch.int16))


@pytest.mark.parametrize("with_hessian", [False, True])
def test_project_reencodes_only_selected_groups(with_hessian):
    layer, index = make_layer(out_features=16, in_features=64, num_codebooks=2, nbits=8, bias=False, seed=3)
    target = torch.randn(16, 64) * 0.5
    mask = torch.zeros(layer.group_shape, dtype=torch.bool)
    mask[:8, :4] = True
    hessian = None
    if with_hessian:
        x = torch.randn(256, 64)
        hessian = x.T @ x / 256
    before = layer.dequantize().clone()
    layer.project_(target, mask, hessian=hessian)
    changed = (codes_to_index(layer.codes) != index).any(-1)
    assert changed.any() and not (changed & ~mask).any()
    after = layer.dequantize()
    # in the selected groups, plain squared error to the target went down
    sel = mask.repeat_interleave(8, dim=1)
    if not with_hessian:
        assert ((after - target)[sel] ** 2).sum() < ((before - target)[sel] ** 2).sum()
    else:
        def err(w):
            r = w - target
            return float(((r @ hessian) * r).sum())
        assert err(after) < err(before)
    # projecting everything, then again, never gets worse
    layer.project_(target)
    once = float(((layer.dequantize() - target) ** 2).sum())
    layer.project_(target)
    assert float(((layer.dequantize() - target) ** 2).sum()) <= once * (1 + 1e-6)
    assert torch.equal(dequantize_additive(layer.codes, layer.codebooks, layer.scales), layer.dequantize())


def test_nibble_checkpoint_tensors_round_trip_bit_exactly():
    """Through the checkpoint helpers: float16 on disk, the same codes/codebooks/scales back."""
    from torch import nn

    from nibble.formats.checkpoint import install_quantized_layers, load_storage_state_dict, storage_state_dict

    model = nn.Sequential(nn.Linear(32, 12), nn.ReLU())
    layer, _ = make_layer(nbits=10)
    model[0] = layer
    tensors = storage_state_dict(model)
    assert tensors["0.codebooks"].dtype == torch.float16 and tensors["0.codes"].dtype == torch.int16
    fresh = nn.Sequential(nn.Linear(32, 12), nn.ReLU())
    install_quantized_layers(fresh, {"0": layer.format_config()})
    load_storage_state_dict(fresh, tensors, "test")
    assert isinstance(fresh[0], AQLMLinear)
    for name in ("codes", "codebooks", "scales"):
        assert torch.equal(getattr(fresh[0], name), getattr(layer, name)), name


def test_project_with_column_weights_fits_the_heavy_columns_better():
    target_layer, _ = make_layer(out_features=64, in_features=64, bias=False, seed=5)
    weights = torch.ones(64)
    weights[::8] = 1e4  # the first column of every group dominates the weighted error
    target = target_layer.dequantize() + torch.randn(64, 64, generator=torch.Generator().manual_seed(6)) * 0.3
    plain, _ = make_layer(out_features=64, in_features=64, bias=False, seed=5)
    weighted, _ = make_layer(out_features=64, in_features=64, bias=False, seed=5)
    plain.project_(target)
    weighted.project_(target, column_weights=weights)

    def weighted_error(layer):
        return float(((layer.dequantize() - target) ** 2 * weights).sum())
    heavy = slice(0, 64, 8)
    assert weighted_error(weighted) < weighted_error(plain)
    assert ((weighted.dequantize() - target)[:, heavy] ** 2).sum() < ((plain.dequantize() - target)[:, heavy] ** 2).sum()
    with pytest.raises(ValueError, match="not both"):
        weighted.project_(target, column_weights=weights, hessian=torch.eye(64))
