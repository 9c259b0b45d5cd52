"""Quantized Linear and Conv2d: outputs and all gradients against a hand-built reference that
quantizes the operands of the three GEMMs with the format functions directly."""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from nibble.train import QConv2d, QLinear, Recipe, get_recipe
from nibble.train.formats import RADIX2, RADIX4_EVEN, RADIX4_ODD, quantize_log, quantize_mxfp4, quantize_nvfp4
from nibble.train.quantizers import (
    grad_scale, quantize_activation_pact, quantize_grad_log, quantize_weight_sawb, random_hadamard, random_signs,
    sawb_clip,
)

BACKWARD_SEED = 123


def _log_grad(fmt, rounding: str = "nearest"):
    """Per-tensor GradScale and one logarithmic format (``None``: fp32), as ``q(g, reduction_dim)``."""
    return lambda g, dim: g if fmt is None else quantize_log(g, grad_scale(g), fmt, rounding)


def _dithered_blocks(fmt):
    return lambda g, dim: quantize_grad_log(g, fmt, dim=dim, block=32, dither=True, debias=True)


INT4_GRADS = {  # (input-gradient quantizer, weight-gradient quantizer)
    "int4-forward": (_log_grad(None), _log_grad(None)),
    "ibm-fp4": (_log_grad(RADIX4_EVEN), _log_grad(RADIX4_ODD)),
    "ibm-fp4-sr": (_log_grad(RADIX4_EVEN, "stochastic"), _log_grad(RADIX4_ODD, "stochastic")),
    "ibm-fp4-dither": (_dithered_blocks(RADIX4_EVEN), _dithered_blocks(RADIX4_ODD)),
    "fp4-radix2": (_log_grad(RADIX2), _log_grad(RADIX2)),
}
FP4 = {  # nearest quantizer, stochastic quantizer, Hadamard block
    "mxfp4": (lambda t, d: quantize_mxfp4(t, d), lambda t, d: quantize_mxfp4(t, d, "stochastic", True), 32),
    "nvfp4": (lambda t, d: quantize_nvfp4(t, d), lambda t, d: quantize_nvfp4(t, d, "stochastic"), 16),
}


@dataclass
class Gemms:
    """The three GEMMs of a layer type, on already-quantized operands."""

    forward: Callable
    dgrad: Callable
    wgrad: Callable
    bias_shape: tuple


LINEAR = Gemms(forward=lambda x, w: x @ w.T, dgrad=lambda g, w, x: g @ w, wgrad=lambda g, x, w: g.T @ x,
               bias_shape=(1, -1))
CONV = Gemms(forward=lambda x, w: F.conv2d(x, w, stride=2, padding=1),
             dgrad=lambda g, w, x: conv2d_input(x.shape, w, g, stride=2, padding=1),
             wgrad=lambda g, x, w: conv2d_weight(x, w.shape, g, stride=2, padding=1),
             bias_shape=(1, -1, 1, 1))


def int4_reference(name: str, layer, x: torch.Tensor, g: torch.Tensor, ops: Gemms) -> dict:
    """Signed inputs: the SAWB clip of x, re-fitted at every call, gradients straight through to
    every element; non-negative ones: PACT's learned clip, the clipped elements' gradient going to
    the clip."""
    signed = bool(layer.pact_signed)
    alpha = sawb_clip(x) if signed else layer.alpha.detach()
    low = -alpha if signed else torch.zeros(())
    w, b = layer.weight.detach(), layer.bias.detach()
    xq = quantize_activation_pact(x.clamp(low, alpha), alpha, 4, signed)
    wq = quantize_weight_sawb(w)
    dgrad_q, wgrad_q = INT4_GRADS[name]
    torch.manual_seed(BACKWARD_SEED)  # the layer's backward draws its random bits in this order
    dx_unmasked = ops.dgrad(dgrad_q(g, 1), wq, x)  # reduction over output features (channels)
    inside = torch.ones_like(x, dtype=torch.bool) if signed else (x < alpha) & (x >= 0)
    reference = {"y": ops.forward(xq, wq) + b.view(ops.bias_shape),
                 "dx": dx_unmasked * inside,
                 "dw": ops.wgrad(wgrad_q(g, 0), xq, w)}  # reduction over rows (batch, positions)
    if not signed:
        reference["dalpha"] = dx_unmasked[x >= alpha].sum()
    return reference


def fp4_reference(name: str, layer, x: torch.Tensor, g: torch.Tensor, ops: Gemms) -> dict:
    nearest, stochastic, block = FP4[name]
    w, b = layer.weight.detach(), layer.bias.detach()
    y = ops.forward(nearest(x, 1), nearest(w, 1)) + b.view(ops.bias_shape)
    torch.manual_seed(BACKWARD_SEED)
    dx = ops.dgrad(stochastic(g, 1), nearest(w, 0), x)
    rows = x.shape[0]
    signs = random_signs(rows + (-rows) % block)
    gh, xh = random_hadamard(g, signs, block, 0), random_hadamard(x, signs, block, 0)
    return {"y": y, "dx": dx, "dw": ops.wgrad(stochastic(gh, 0), nearest(xh, 0), w)}


def run_layer(layer, x: torch.Tensor, g: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    y = layer(x)
    torch.manual_seed(BACKWARD_SEED)
    y.backward(g)
    out = {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad}
    if getattr(layer, "alpha", None) is not None and layer.alpha.grad is not None:
        out["dalpha"] = layer.alpha.grad
    bias_grad = g.sum((0, 2, 3)) if isinstance(layer, QConv2d) else g.reshape(-1, g.shape[-1]).sum(0)
    assert torch.allclose(layer.bias.grad, bias_grad, atol=1e-5)
    return out


def make_layer(kind: str, recipe: Recipe):
    torch.manual_seed(1)
    if kind == "linear":
        return QLinear(48, 24, recipe), torch.randn(64, 48), torch.randn(64, 24)
    conv = QConv2d(16, 8, 3, stride=2, padding=1, recipe=recipe)
    return conv, torch.relu(torch.randn(40, 16, 6, 6)), torch.randn(40, 8, 3, 3)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("name", [*INT4_GRADS, *FP4])
def test_quantized_layer_matches_hand_built_reference(name, kind):
    layer, x, g = make_layer(kind, get_recipe(name))
    got = run_layer(layer, x, g)
    reference = (int4_reference if name in INT4_GRADS else fp4_reference)(name, layer, x, g,
                                                                        LINEAR if kind == "linear" else CONV)
    assert set(reference) == set(got)
    for key, value in reference.items():
        assert torch.allclose(got[key], value, rtol=1e-4, atol=1e-4), key


def test_linear_on_three_dimensional_inputs_with_signed_pact():
    layer = QLinear(32, 16, get_recipe("ibm-fp4"))
    x, g = torch.randn(4, 8, 32), torch.randn(4, 8, 16)
    got = run_layer(layer, x, g)
    assert bool(layer.pact_signed)
    reference = int4_reference("ibm-fp4", layer, x.reshape(32, 32), g.reshape(32, 16), LINEAR)
    for key, value in reference.items():
        assert torch.allclose(got[key].reshape(value.shape), value, rtol=1e-4, atol=1e-4), key
    # inputs beyond the SAWB clip saturate in the forward but keep their gradient
    clipped = x.abs() >= sawb_clip(x)
    assert 0 < int(clipped.sum()) < x.numel() // 10
    assert bool((got["dx"][clipped] != 0).all())


def test_all_fp32_recipe_is_exactly_the_float_layer():
    plain = Recipe("plain", "every operand fp32")
    torch.manual_seed(0)
    reference = nn.Linear(20, 10)
    layer = QLinear.wrap(reference, plain)
    assert layer.weight is reference.weight and layer.bias is reference.bias
    x = torch.randn(7, 20, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    weight_grad = reference.weight.grad.clone()
    reference.weight.grad = None
    reference(x_ref).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert torch.allclose(weight_grad, reference.weight.grad, atol=1e-5)


@pytest.mark.parametrize("name,minimum", [("int4-forward", 0.95), ("ibm-fp4", 0.9), ("fp4-radix2", 0.8),
                                          ("mxfp4", 0.9), ("nvfp4", 0.9)])
def test_quantized_weight_gradient_points_like_the_float_one(name, minimum):
    layer, x, g = make_layer("linear", get_recipe(name))
    got = run_layer(layer, x, g)["dw"]
    exact = g.T @ x
    assert F.cosine_similarity(got.flatten(), exact.flatten(), dim=0) > minimum
