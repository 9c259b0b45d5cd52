"""4-bit training: number formats, quantized layers and recipes (``prepare(model, recipe)``)."""

from nibble.train.layers import QConv2d, QLinear
from nibble.train.recipes import RECIPES, Recipe, get_recipe, kept_layers, prepare, quantized_layers

__all__ = ["RECIPES", "Recipe", "QConv2d", "QLinear", "get_recipe", "kept_layers", "prepare", "quantized_layers"]
