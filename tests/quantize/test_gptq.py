import pytest
import torch

from nibble.errors import ConfigError
from nibble.quantize import GPTQConfig, RTNConfig
from nibble.quantize.gptq import GPTQQuantizer
from nibble.quantize.rtn import RTNQuantizer


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(0, 1, d)
    return (torch.randn(n, d, generator=g) @ mixing) * scales + torch.randn(n, 1, generator=g)


def output_error(layer, linear, x):
    return ((x @ layer.dequantize().T - x @ linear.weight.T).pow(2).mean() / (x @ linear.weight.T).pow(2).mean()).item()


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (4, -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn(bits, group, act_order):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    x = correlated_inputs(2048, 128)
    hessian = (x.T.double() @ x.double()) / x.shape[0]
    rtn = RTNQuantizer(RTNConfig(bits, group)).quantize_layer("l", linear, None)
    gptq = GPTQQuantizer(GPTQConfig(bits, group, act_order=act_order)).quantize_layer("l", linear, hessian)
    assert output_error(gptq, linear, x) < 0.9 * output_error(rtn, linear, x)
    assert gptq.bits_per_weight() == rtn.bits_per_weight()


def test_gptq_with_identity_hessian_is_rtn():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    rtn = RTNQuantizer(RTNConfig(4, 32)).quantize_layer("l", linear, None)
    gptq = GPTQQuantizer(GPTQConfig(4, 32, damp=1e-6)).quantize_layer("l", linear, torch.eye(64, dtype=torch.float64))
    assert torch.equal(gptq.integers(), rtn.integers())


def test_dead_inputs_get_zero_weight():
    linear = torch.nn.Linear(64, 8)
    x = correlated_inputs(512, 64)
    x[:, 5] = 0
    gptq = GPTQQuantizer(GPTQConfig(4, 32)).quantize_layer("l", linear, x.T.double() @ x.double())
    assert torch.allclose(gptq.dequantize()[:, 5], torch.zeros(8), atol=gptq.scales.max().item())


@pytest.mark.parametrize("kwargs", [dict(bits=5), dict(group_size=0), dict(damp=0.0)])
def test_invalid_configs_are_refused(kwargs):
    with pytest.raises(ConfigError):
        GPTQConfig(**kwargs).validate()


def test_a_group_size_that_does_not_divide_the_width_leaves_a_shorter_last_group():
    """SmolLM2's 576-wide layers with groups of 128: four full groups and one of 64 columns."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 16)
    x = correlated_inputs(1024, 576)
    hessian = (x.T.double() @ x.double()) / x.shape[0]
    rtn = RTNQuantizer(RTNConfig(4, 128)).quantize_layer("l", linear, None)
    assert rtn.scales.shape == (16, 5)
    # the last group's grid is fitted to its own 64 columns: RTN error there is at most half a step
    tail = (rtn.dequantize()[:, 512:] - linear.weight[:, 512:]).abs()
    assert (tail <= rtn.scales[:, 4:5] / 2 + 1e-6).all()
    for act_order in (False, True):
        gptq = GPTQQuantizer(GPTQConfig(4, 128, act_order=act_order)).quantize_layer("l", linear, hessian)
        assert gptq.scales.shape == (16, 5)
        assert output_error(gptq, linear, x) < 0.9 * output_error(rtn, linear, x)


def test_a_group_larger_than_the_layer_is_one_group_per_row():
    rtn = RTNQuantizer(RTNConfig(4, 128)).quantize_layer("l", torch.nn.Linear(64, 8), None)
    assert rtn.group_size == 64 and rtn.scales.shape == (8, 1)
