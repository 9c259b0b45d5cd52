"""Recipes and ``prepare``: which layers change, overrides, errors, and a short training run
whose loss falls under every recipe."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nibble.errors import ConfigError
from nibble.train import RECIPES, QConv2d, QLinear, Recipe, get_recipe, kept_layers, prepare, quantized_layers
from nibble.train.tasks.lm import TinyLM

REQUIRED = ("fp32", "int4-forward", "ibm-fp4", "fp4-radix2", "mxfp4", "nvfp4")


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4),
    )


def test_every_required_recipe_exists():
    assert set(REQUIRED) <= set(RECIPES)
    assert get_recipe("ibm-fp4").dgrad_grad == "log4-even" and get_recipe("ibm-fp4").wgrad_grad == "log4-odd"
    assert get_recipe("nvfp4").hadamard == 16 and get_recipe("mxfp4").hadamard == 32


def test_prepare_keeps_first_and_last_and_shares_master_weights():
    model = small_cnn()
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    prepare(model, "ibm-fp4")
    assert quantized_layers(model) == ["3", "8"]
    assert type(model[0]) is nn.Conv2d and type(model[10]) is nn.Linear
    assert isinstance(model[3], QConv2d) and isinstance(model[8], QLinear)
    assert all(dict(model.named_modules())[name].weight is weight for name, weight in weights.items())
    assert any(name.endswith("alpha") for name, _ in model.named_parameters())


def test_prepare_overrides_and_errors():
    assert quantized_layers(prepare(small_cnn(), "mxfp4", keep=[])) == ["0", "3", "8", "10"]
    assert quantized_layers(prepare(small_cnn(), "nvfp4", keep=["first", "8"])) == ["3", "10"]
    assert kept_layers(TinyLM(dim=16, layers=1, context=8), ["first", "last", "blocks.0.fc"]) == {
        "embed", "head", "blocks.0.fc"}
    unchanged = small_cnn()
    assert quantized_layers(prepare(unchanged, "fp32")) == []
    with pytest.raises(ConfigError):
        prepare(small_cnn(), "int3")
    with pytest.raises(ConfigError):
        Recipe("bad", "unknown operand", weight="int5")
    with pytest.raises(ConfigError):
        Recipe("bad", "only backward operands can reuse the forward's", weight="forward")
    with pytest.raises(ConfigError):
        Recipe("bad", "PACT clips activations only", dgrad_grad="int4-pact")
    with pytest.raises(ConfigError):
        Recipe("bad", "hadamard must be a power of two", hadamard=24)


def _train(model: nn.Module, batches, loss_fn, steps: int) -> tuple[float, float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, *batches(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def _blobs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    templates = torch.Generator().manual_seed(99)
    centres = torch.randn(4, 1, 8, 8, generator=templates)
    labels = torch.randint(0, 4, (64,), generator=generator)
    return centres[labels] + 1.5 * torch.randn(64, 1, 8, 8, generator=generator), labels


def _pattern(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.tensor(list(b"the cat sat on the mat. " * 40))
    starts = torch.randint(0, text.numel() - 17, (32,), generator=torch.Generator().manual_seed(step))
    chunk = torch.stack([text[s:s + 17] for s in starts])
    return chunk[:, :-1], chunk[:, 1:]


@pytest.mark.parametrize("name", list(RECIPES))
def test_cnn_loss_falls_under_every_recipe(name):
    model = prepare(small_cnn(), name)
    first, last = _train(model, _blobs, lambda m, x, y: F.cross_entropy(m(x), y), steps=40)
    assert last < 0.5 * first


@pytest.mark.parametrize("name", list(RECIPES))
def test_transformer_loss_falls_under_every_recipe(name):
    model = prepare(TinyLM(dim=32, layers=1, heads=2, context=16), name)
    assert name == "fp32" or len(quantized_layers(model)) == 4
    first, last = _train(model, _pattern, lambda m, x, y: F.cross_entropy(m(x).flatten(0, 1), y.flatten()), 40)
    assert last < 0.6 * first
