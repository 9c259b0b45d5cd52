"""Configs and the layer-quantizer interface the calibration pipeline drives.

A method is a ``QuantConfig`` subclass (a frozen dataclass, saved as JSON with every checkpoint)
paired with a ``LayerQuantizer`` subclass. The pipeline hands the quantizer one ``nn.Linear`` at a
time with its input second-moment matrix H = XᵀX; after all layers of a block are replaced it calls
``finetune_block`` (a no-op unless the method tunes blocks, as AQLM does).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from nibble.errors import ConfigError

if TYPE_CHECKING:
    from nibble.calibrate.pipeline import BlockData
    from nibble.formats.base import QuantizedLinear

METHODS: dict[str, tuple[type["QuantConfig"], type["LayerQuantizer"]]] = {}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Base of every method's config. ``method`` names it in JSON and on the command line."""

    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def validate(self) -> None:
        """Raise ``ConfigError`` for settings the method cannot honour."""


def register_method(config_cls: type[QuantConfig]):
    """Class decorator on a ``LayerQuantizer``: pair it with ``config_cls`` under its method name."""

    def decorate(quantizer_cls: type[LayerQuantizer]) -> type[LayerQuantizer]:
        METHODS[config_cls.method] = (config_cls, quantizer_cls)
        return quantizer_cls

    return decorate


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """Rebuild a config saved by ``to_dict``."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; known: {', '.join(sorted(METHODS))}")
    config_cls = METHODS[method][0]
    names = {f.name for f in dataclasses.fields(config_cls)}
    config = config_cls(**{k: v for k, v in data.items() if k in names})
    config.validate()
    return config


class LayerQuantizer:
    """Turns dense linear layers into ``QuantizedLinear`` modules, given calibration statistics."""

    needs_hessian: ClassVar[bool] = True  # pipeline accumulates H = XᵀX per layer
    needs_block_targets: ClassVar[bool] = False  # pipeline keeps full-precision block outputs

    def __init__(self, config: QuantConfig):
        config.validate()
        self.config = config

    def quantize_layer(self, name: str, linear: nn.Linear, hessian: torch.Tensor | None) -> "QuantizedLinear":
        """Quantize one layer. ``hessian`` is XᵀX over calibration tokens, [in, in], float64
        (None when the method declares ``needs_hessian = False``)."""
        raise NotImplementedError

    def finetune_block(self, block: nn.Module, data: "BlockData") -> dict[str, float]:
        """Optionally tune the quantized block's continuous parameters; returns metrics to log."""
        return {}
