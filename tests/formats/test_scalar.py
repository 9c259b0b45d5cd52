import pytest
import torch

from nibble.formats.scalar import ScalarQuantLinear
from nibble.quantize.rtn import RTNConfig, RTNQuantizer

TOLERANCE = {2: 0.35, 3: 0.15, 4: 0.07, 8: 0.005}  # relative weight error of RTN per bit width


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,group", [((16, 64), 32), ((8, 96), -1), ((5, 40), 8), ((6, 80), 32)])  # 80: last group 16
def test_rtn_layer_matches_its_grid(bits, symmetric, shape, group):
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0])
    layer = RTNQuantizer(RTNConfig(bits, group, symmetric)).quantize_layer("l", linear, None)
    q = layer.integers()
    assert q.min() >= 0 and q.max() < 2**bits
    weight = layer.dequantize()
    rel = (weight - linear.weight).norm() / linear.weight.norm()
    assert rel < TOLERANCE[bits]
    x = torch.randn(3, shape[1])
    torch.testing.assert_close(layer(x), x @ weight.T + linear.bias)


def test_empty_from_config_loads_the_same_state():
    linear = torch.nn.Linear(64, 16)
    layer = RTNQuantizer(RTNConfig(3, 32)).quantize_layer("l", linear, None)
    clone = ScalarQuantLinear.empty(layer.format_config())
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.dequantize(), layer.dequantize())


def test_storage_bits_count_codes_scales_and_zeros():
    layer = ScalarQuantLinear(128, 8, bits=4, group_size=64, symmetric=False)
    assert layer.storage_bits() == {"codes": 8 * 128 * 4, "scales": 8 * 2 * 16, "zeros": 8 * 2 * 8}
    assert layer.bits_per_weight() == pytest.approx(4 + 24 / 64)
    assert "zeros" not in ScalarQuantLinear(128, 8, 4, 64, symmetric=True).storage_bits()


def test_project_rounds_only_selected_weights_onto_the_grid():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 8)
    layer = RTNQuantizer(RTNConfig(4, 32)).quantize_layer("l", linear, None)
    before = layer.integers().clone()
    target = layer.dequantize() + 0.5 * torch.randn(8, 64) * layer.scales.repeat_interleave(32, 1)
    mask = torch.zeros(8, 64, dtype=torch.bool)
    mask[:, :10] = True
    layer.project_(target, mask)
    after = layer.integers()
    assert torch.equal(after[~mask], before[~mask])
    grid = layer.dequantize()
    # every selected weight is now the nearest representable value to its target
    candidates = layer.scales.repeat_interleave(32, 1)[..., None] * (
        torch.arange(16.0) - layer.zero_points().repeat_interleave(32, 1)[..., None])
    nearest = candidates.gather(-1, (candidates - target[..., None]).abs().argmin(-1, keepdim=True))[..., 0]
    torch.testing.assert_close(grid[mask], nearest[mask])


def test_ragged_last_group_counts_its_own_scale_and_zero():
    layer = ScalarQuantLinear(80, 8, bits=4, group_size=32, symmetric=False)  # groups of 32, 32, 16
    assert layer.scales.shape == (8, 3)
    assert layer.storage_bits() == {"codes": 8 * 96 * 4, "scales": 8 * 3 * 16, "zeros": 8 * 3 * 8}
