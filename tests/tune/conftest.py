"""Fixtures for the PV-Tuning tests: a tiny teacher with peaked outputs and its quantized students."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llama
from nibble.formats.aqlm import AQLMLinear, index_to_codes
from nibble.models import decoder_blocks, linear_layers, set_submodule
from nibble.quantize import RTNConfig, quantize_



def sharp_llama(seed: int = 0, layers: int = 2):
    """A random tiny Llama whose next-token distributions are peaked (final norm weight × 20)."""
    model = tiny_llama(seed, layers)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_windows(n: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def scalar_student(teacher, bits: int = 3, group_size: int = 32):
    student = copy.deepcopy(teacher)
    quantize_(student, RTNConfig(bits=bits, group_size=group_size), None, progress=False)
    return student


def aqlm_layer(linear: torch.nn.Linear, num_codebooks: int = 2, nbits: int = 4, group_size: int = 8,
               seed: int = 0) -> AQLMLinear:
    """An AQLM layer fit to ``linear`` greedily (residual vector quantization on random codebooks)."""
    g = torch.Generator().manual_seed(seed)
    weight = linear.weight.detach().float()
    scales = (weight.norm(dim=1) / weight.shape[1] ** 0.5).half().float()
    codebooks = (torch.randn(num_codebooks, 2**nbits, group_size, generator=g) / num_codebooks**0.5).half().float()
    residual = (weight / scales[:, None]).reshape(-1, group_size)
    index = []
    for book in codebooks:
        nearest = torch.cdist(residual, book).argmin(dim=1)
        residual = residual - book[nearest]
        index.append(nearest)
    codes = torch.stack(index, dim=-1).reshape(linear.out_features, -1, num_codebooks)
    return AQLMLinear(linear.in_features, linear.out_features, num_codebooks, nbits, group_size,
                      codes=index_to_codes(codes, nbits), codebooks=codebooks, scales=scales)


def aqlm_student(teacher, **kwargs):
    student = copy.deepcopy(teacher)
    for block in decoder_blocks(student):
        for name, linear in linear_layers(block).items():
            set_submodule(block, name, aqlm_layer(linear, **kwargs))
    return student


@pytest.fixture
def teacher():
    return sharp_llama()


@pytest.fixture
def windows():
    """24 random windows of 32 tokens: the first 16 for training, the last 8 held out."""
    return random_windows(24)


@pytest.fixture
def make_scalar_student():
    return scalar_student


@pytest.fixture
def make_aqlm_student():
    return aqlm_student
