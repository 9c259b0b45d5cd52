"""Training recipes (which format each GEMM operand uses) and ``prepare``, which applies one.

| recipe           | forward W / X         | dY (input grad / weight grad)          | backward W / X  |
| ---------------- | --------------------- | -------------------------------------- | --------------- |
| `fp32`           | fp32                  | fp32                                   | fp32            |
| `int4-forward`   | INT4 SAWB / INT4 PACT | fp32                                   | forward's INT4  |
| `ibm-fp4`        | INT4 SAWB / INT4 PACT | radix-4 FP4, GradScale, two-phase      | forward's INT4  |
| `ibm-fp4-sr`     | INT4 SAWB / INT4 PACT | as ibm-fp4, stochastic rounding        | forward's INT4  |
| `ibm-fp4-dither` | INT4 SAWB / INT4 PACT | as ibm-fp4, dithered GradScale per 32, | forward's INT4  |
|                  |                       | divided by its expected gain           |                 |
| `fp4-radix2`     | INT4 SAWB / INT4 PACT | radix-2 FP4, GradScale                 | forward's INT4  |
| `mxfp4`          | MXFP4 (nearest)       | MXFP4 stochastic, Hadamard on W-grad   | MXFP4 (nearest) |
| `nvfp4`          | NVFP4 (nearest)       | NVFP4 stochastic, Hadamard on W-grad   | NVFP4 (nearest) |

By default the first and last layers (in registration order, counting Linear, Conv2d and
Embedding modules) stay full precision; ``prepare(..., keep=...)`` overrides that.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Sequence

from torch import nn

from nibble.errors import ConfigError
from nibble.train.layers import QConv2d, QLinear
from nibble.train.operands import FORWARD, OPERAND_NAMES, PACT, GemmPlan, operand_quantizer

FIRST, LAST = "first", "last"
_OPERAND_FIELDS = ("weight", "act", "dgrad_grad", "dgrad_weight", "wgrad_grad", "wgrad_act")
_REUSING_FIELDS = ("dgrad_weight", "wgrad_act")  # may say "forward"
_ACTIVATION_FIELDS = ("act", "wgrad_act")  # may say "int4-pact"


@dataclass(frozen=True)
class Recipe:
    """Operand formats of the three GEMMs of every quantized layer, and the layers kept in fp32.

    ``dgrad_weight`` / ``wgrad_act`` may be ``"forward"``: the backward GEMM reuses the operand
    as the forward GEMM quantized it (what straight-through QAT and the IBM method do).
    """

    name: str
    summary: str
    weight: str = "fp32"  # forward GEMM, W
    act: str = "fp32"  # forward GEMM, X ("int4-pact": learned clip)
    dgrad_grad: str = "fp32"  # input-gradient GEMM, dY
    dgrad_weight: str = FORWARD  # input-gradient GEMM, W
    wgrad_grad: str = "fp32"  # weight-gradient GEMM, dY
    wgrad_act: str = FORWARD  # weight-gradient GEMM, X
    hadamard: int = 0  # random Hadamard block on the weight-gradient reduction (0: none)
    keep: tuple[str, ...] = (FIRST, LAST)  # layer names (fnmatch patterns), "first", "last"

    def __post_init__(self) -> None:
        for name in _OPERAND_FIELDS:
            value = getattr(self, name)
            allowed = value in OPERAND_NAMES or (value == FORWARD and name in _REUSING_FIELDS)
            if not allowed or (value == PACT and (name not in _ACTIVATION_FIELDS or self.act != PACT)):
                raise ConfigError(f"recipe {self.name}: format {value!r} is not allowed for {name}")
        if self.hadamard < 0 or self.hadamard & (self.hadamard - 1):
            raise ConfigError(f"recipe {self.name}: Hadamard block must be 0 or a power of two")

    @property
    def uses_pact(self) -> bool:
        return self.act == PACT

    @property
    def quantizes(self) -> bool:
        """Whether any operand leaves fp32."""
        return any(getattr(self, f) not in ("fp32", FORWARD) for f in _OPERAND_FIELDS) or self.hadamard > 0

    def plan(self, alpha=None, signed: bool = False) -> GemmPlan:
        """The operand quantizers for one call (``alpha``: the layer's PACT clip)."""
        def quantizer(name: str):
            return None if name == FORWARD else operand_quantizer(name, alpha, signed)

        return GemmPlan(x=quantizer(self.act), w=quantizer(self.weight),
                        dgrad_g=quantizer(self.dgrad_grad), dgrad_w=quantizer(self.dgrad_weight),
                        wgrad_g=quantizer(self.wgrad_grad), wgrad_x=quantizer(self.wgrad_act),
                        hadamard=self.hadamard)


_INT4_FORWARD = dict(weight="int4-sawb", act=PACT)
_FP4 = {fmt: dict(weight=fmt, act=fmt, dgrad_grad=f"{fmt}-sr", dgrad_weight=fmt, wgrad_grad=f"{fmt}-sr",
                  wgrad_act=fmt) for fmt in ("mxfp4", "nvfp4")}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fp32", "full precision (no layer is changed)", keep=()),
    Recipe("int4-forward", "INT4 weights (SAWB) and activations (PACT); fp32 gradients", **_INT4_FORWARD),
    Recipe("ibm-fp4", "INT4 forward; radix-4 FP4 gradients with GradScale and two-phase rounding",
           **_INT4_FORWARD, dgrad_grad="log4-even", wgrad_grad="log4-odd"),
    Recipe("ibm-fp4-sr", "ibm-fp4 with the FP4 gradients rounded stochastically (unbiased) instead of to nearest",
           **_INT4_FORWARD, dgrad_grad="log4-even-sr", wgrad_grad="log4-odd-sr"),
    Recipe("ibm-fp4-dither", "ibm-fp4 with one GradScale per 32 gradient values along each GEMM's reduction, "
           "each raised by a random 2^u (u in [0, 2)) and divided by the mean gain of nearest rounding "
           "(1.2/ln 4): nearest rounding without its bias",
           **_INT4_FORWARD, dgrad_grad="log4-even-udither-b32", wgrad_grad="log4-odd-udither-b32"),
    Recipe("fp4-radix2", "INT4 forward; radix-2 FP4 gradients with GradScale (control)",
           **_INT4_FORWARD, dgrad_grad="log2", wgrad_grad="log2"),
    Recipe("mxfp4", "MXFP4 GEMMs: nearest forward, stochastic gradients, Hadamard (32) on the weight gradient",
           **_FP4["mxfp4"], hadamard=32),
    Recipe("nvfp4", "NVFP4 GEMMs: nearest forward, stochastic gradients, Hadamard (16) on the weight gradient",
           **_FP4["nvfp4"], hadamard=16),
)}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A recipe by name (or the recipe itself)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    return RECIPES[recipe]


def _ordered_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]


def kept_layers(model: nn.Module, keep: Sequence[str]) -> set[str]:
    """Names of the layers ``keep`` selects: ``first``, ``last`` or fnmatch patterns on module names."""
    ordered = _ordered_layers(model)
    kept = set()
    for pattern in keep:
        if pattern == FIRST:
            kept.update(ordered[:1])
        elif pattern == LAST:
            kept.update(ordered[-1:])
        else:
            kept.update(name for name in ordered if fnmatch(name, pattern))
    return kept


def _wrap(module: nn.Module, recipe: Recipe) -> nn.Module | None:
    """The quantized replacement of ``module``, or None when it is not a supported layer."""
    if isinstance(module, (QLinear, QConv2d)):
        return None
    if isinstance(module, nn.Linear):
        return QLinear.wrap(module, recipe)
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return QConv2d.wrap(module, recipe)
    return None


def prepare(model: nn.Module, recipe: str | Recipe, keep: Sequence[str] | None = None) -> nn.Module:
    """Swap the model's Linear/Conv2d layers for quantized ones, in place; returns the model.

    The quantized layers share the original weight and bias parameters (full-precision master
    copies); PACT clips are new parameters, so build the optimizer after calling ``prepare``.
    ``keep`` overrides the recipe's list of full-precision layers (``[]`` quantizes all).
    Convolutions with string padding or a non-zero padding mode stay fp32.
    """
    recipe = get_recipe(recipe)
    if not recipe.quantizes:
        return model
    kept = kept_layers(model, recipe.keep if keep is None else keep)
    for name, module in list(model.named_modules()):
        if not name or name in kept:
            continue
        replacement = _wrap(module, recipe)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)
    return model


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the layers ``prepare`` replaced."""
    return [name for name, m in model.named_modules() if isinstance(m, (QLinear, QConv2d))]

