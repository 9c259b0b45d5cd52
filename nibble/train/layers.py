"""Quantized Linear and Conv2d layers for training.

Each layer keeps its full-precision weight (the master copy the optimizer updates) and runs an
autograd function that quantizes the operands of the forward, input-gradient and weight-gradient
GEMMs as a :class:`~nibble.train.operands.GemmPlan` says. Gradients reach the full-precision
weight and input straight through the quantizers; with PACT the activation clip is learned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from nibble.train.operands import PACT_BITS, GemmPlan
from nibble.train.quantizers import init_pact_alpha, pact_clip, random_hadamard, random_signs, sawb_clip

if TYPE_CHECKING:
    from nibble.train.recipes import Recipe

MIN_ALPHA = 1e-4


def weight_gradient_operands(g: torch.Tensor, x: torch.Tensor, plan: GemmPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized ``(g, x)`` for the weight-gradient GEMM, whose reduction runs along dim 0 of both.

    With ``plan.hadamard`` both first get the same random Hadamard transform along dim 0 (rows of
    a linear layer, the batch of a conv). ``x`` is left as is when ``plan.wgrad_x`` is None
    (it was quantized in the forward pass).
    """
    if plan.hadamard:
        signs = random_signs(g.shape[0] + (-g.shape[0]) % plan.hadamard, g.device)
        g = random_hadamard(g, signs, plan.hadamard, 0)
        x = random_hadamard(x, signs, plan.hadamard, 0)
    x = x if plan.wgrad_x is None else plan.wgrad_x(x, 0)
    return plan.wgrad_g(g, 0), x


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan):
        x2 = x.reshape(-1, x.shape[-1])
        xq, wq = plan.x(x2, 1), plan.w(weight, 1)
        ctx.plan, ctx.x_shape, ctx.has_bias = plan, x.shape, bias is not None
        ctx.save_for_backward(xq if plan.wgrad_x is None else x2, wq if plan.dgrad_w is None else weight)
        return F.linear(xq, wq, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_saved, w_saved = ctx.saved_tensors
        plan: GemmPlan = ctx.plan
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_d = w_saved if plan.dgrad_w is None else plan.dgrad_w(w_saved, 0)
            grad_x = (plan.dgrad_g(g2, 1) @ w_d).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            g_w, x_w = weight_gradient_operands(g2, x_saved, plan)
            grad_w = g_w.T @ x_w
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


def _conv_args(ctx) -> tuple:
    return ctx.stride, ctx.padding, ctx.dilation, ctx.groups


class _QuantConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan: GemmPlan, stride, padding, dilation, groups):
        xq, wq = plan.x(x, 1), plan.w(weight, 1)
        ctx.plan, ctx.x_shape, ctx.w_shape, ctx.has_bias = plan, x.shape, weight.shape, bias is not None
        ctx.stride, ctx.padding, ctx.dilation, ctx.groups = stride, padding, dilation, groups
        ctx.save_for_backward(xq if plan.wgrad_x is None else x, wq if plan.dgrad_w is None else weight)
        return F.conv2d(xq, wq, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_saved, w_saved = ctx.saved_tensors
        plan: GemmPlan = ctx.plan
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_d = w_saved if plan.dgrad_w is None else plan.dgrad_w(w_saved, 0)
            grad_x = conv2d_input(ctx.x_shape, w_d, plan.dgrad_g(grad, 1), *_conv_args(ctx))
        if ctx.needs_input_grad[1]:
            # the reduction runs over batch and positions; blocks and the Hadamard transform use the
            # batch axis, where they commute with patch extraction: this is exactly the quantized GEMM
            g_w, x_w = weight_gradient_operands(grad, x_saved, plan)
            grad_w = conv2d_weight(x_w, ctx.w_shape, g_w, *_conv_args(ctx))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _QuantizedMixin:
    """Recipe, PACT clip and per-call plan shared by the quantized layers."""

    recipe: "Recipe"

    def _init_quantization(self, recipe: "Recipe", device: torch.device) -> None:
        self.recipe = recipe
        if recipe.uses_pact:
            self.alpha = nn.Parameter(torch.ones((), device=device))
            self.register_buffer("alpha_ready", torch.zeros((), dtype=torch.bool, device=device))
            self.register_buffer("pact_signed", torch.zeros((), dtype=torch.bool, device=device))

    def _clip_and_plan(self, x: torch.Tensor) -> tuple[torch.Tensor, GemmPlan]:
        """Clip x for the INT4 activation quantizer: PACT's learned clip for non-negative inputs,
        the SAWB clip of this x for signed ones (a learned symmetric clip collapsed far below
        the input range on the LM's attention output; docs/training.md).

        Signed inputs are not clipped here: the symmetric INT4 quantizer saturates at the clip,
        and the gradient passes straight through to every element, clipped or not, as it does for
        the SAWB-clipped weights. PACT masks the clipped elements' gradient because its clip
        learns from it; a clip fitted from statistics learns nothing, and masking would only cut
        the gradient of the largest inputs (the LayerNorm outputs' outlier channels)."""
        if not self.recipe.uses_pact:
            return x, self.recipe.plan()
        if not self.alpha_ready:
            self._init_alpha(x)
        if self.pact_signed:
            return x, self.recipe.plan(sawb_clip(x, PACT_BITS), signed=True)
        alpha = self.alpha.clamp_min(MIN_ALPHA)
        return pact_clip(x, alpha), self.recipe.plan(alpha.detach())

    @torch.no_grad()
    def _init_alpha(self, x: torch.Tensor) -> None:
        signed = bool((x < 0).any())
        self.pact_signed.fill_(signed)
        if not signed:  # signed inputs take the SAWB clip of each batch instead
            self.alpha.fill_(init_pact_alpha(x, PACT_BITS, signed))
        self.alpha_ready.fill_(True)


class QLinear(_QuantizedMixin, nn.Linear):
    """``nn.Linear`` whose GEMMs run in the recipe's formats; the weight stays full precision."""

    def __init__(self, in_features: int, out_features: int, recipe: "Recipe", bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantization(recipe, self.weight.device)

    @classmethod
    def wrap(cls, layer: nn.Linear, recipe: "Recipe") -> "QLinear":
        """A QLinear that shares ``layer``'s weight and bias parameters."""
        q = cls(layer.in_features, layer.out_features, recipe, layer.bias is not None,
                device=layer.weight.device, dtype=layer.weight.dtype)
        q.weight, q.bias = layer.weight, layer.bias
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, plan = self._clip_and_plan(x)
        return _QuantLinearFn.apply(x, self.weight, self.bias, plan)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"


class QConv2d(_QuantizedMixin, nn.Conv2d):
    """``nn.Conv2d`` (zero padding given as numbers) whose GEMMs run in the recipe's formats."""

    def __init__(self, *args, recipe: "Recipe", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantization(recipe, self.weight.device)

    @classmethod
    def wrap(cls, layer: nn.Conv2d, recipe: "Recipe") -> "QConv2d":
        """A QConv2d that shares ``layer``'s weight and bias parameters."""
        q = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, layer.bias is not None, recipe=recipe,
                device=layer.weight.device, dtype=layer.weight.dtype)
        q.weight, q.bias = layer.weight, layer.bias
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, plan = self._clip_and_plan(x)
        return _QuantConv2dFn.apply(x, self.weight, self.bias, plan, self.stride, self.padding,
                                    self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"
