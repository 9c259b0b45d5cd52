"""Fashion-MNIST: a small CNN with BatchNorm trained under a recipe; reports test accuracy.

The IDX files come from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``)
or any folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (optionally ``.gz``).
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nibble.errors import DatasetError
from nibble.train.recipes import get_recipe, prepare, quantized_layers
from nibble.train.tasks.common import TrainLog, make_optimizer, seed_everything, train_steps

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # training-set pixel statistics
_IDX_TYPES = {0x08: torch.uint8}


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (unsigned-byte data, gzipped or not) into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(shape):
        raise DatasetError(f"{path}: expected {math.prod(shape)} bytes of data for shape {shape}, found {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"no {stem}[.gz] under {root} (apt-get install dataset-fashion-mnist, or pass --data)")


@dataclass
class ImageSplit:
    images: torch.Tensor  # [N, 1, 28, 28] float, normalised
    labels: torch.Tensor  # [N] int64


def load_split(root: Path | str | None, split: str) -> ImageSplit:
    """The ``train`` or ``test`` split, pixels normalised with the training mean and std."""
    root = Path(root) if root else DEFAULT_ROOT
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{root}: {prefix} images {tuple(images.shape)} and labels "
                           f"{tuple(labels.shape)} do not match")
    x = (images.float().div_(255).sub_(MEAN).div_(STD)).unsqueeze(1)
    return ImageSplit(x, labels.long())


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class SmallCNN(nn.Sequential):
    """Four 3×3 conv layers (width w, 2w, 2w, 4w) with BatchNorm and ReLU, max-pools after the
    first and third, global average pool and a linear head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__(
            *_conv_block(1, width), nn.MaxPool2d(2),
            *_conv_block(width, 2 * width), *_conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
            *_conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
        )


@dataclass(frozen=True)
class FashionConfig:
    epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    width: int = 16
    subset: int | None = None  # train on the first N images only
    data: str | None = None


def _batches(data: ImageSplit, batch_size: int, generator: torch.Generator):
    order = torch.randperm(data.labels.shape[0], generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield data.images[index], data.labels[index]


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSplit, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(data.images[i:i + batch_size]).argmax(1) == data.labels[i:i + batch_size]).sum())
                  for i in range(0, data.labels.shape[0], batch_size))
    return 100.0 * correct / data.labels.shape[0]


def _classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def run_fashion_mnist(recipe: str, seed: int = 0, config: FashionConfig = FashionConfig(),
                      keep: list[str] | None = None, progress: bool = True) -> dict:
    """Train the small CNN under ``recipe`` and report test accuracy, loss and step time."""
    train, test = load_split(config.data, "train"), load_split(config.data, "test")
    if config.subset:
        train = ImageSplit(train.images[:config.subset], train.labels[:config.subset])
    seed_everything(seed)
    model = prepare(SmallCNN(config.width), get_recipe(recipe), keep)
    steps_per_epoch = train.labels.shape[0] // config.batch_size
    optimizer, scheduler = make_optimizer(model, config.lr, config.weight_decay, steps_per_epoch * config.epochs)
    generator = torch.Generator().manual_seed(seed)
    log = TrainLog()
    for epoch in range(config.epochs):
        train_steps(model, _batches(train, config.batch_size, generator), _classification_loss, optimizer,
                    scheduler, steps_per_epoch, f"{recipe} epoch {epoch + 1}/{config.epochs}", progress, log)
    return {"task": "fashion-mnist", "recipe": recipe, "seed": seed, "epochs": config.epochs,
            "accuracy": accuracy(model, test), "loss": log.final_loss, "step_time_s": log.step_time, "step_cpu_s": log.step_cpu_time,
            "steps": len(log.losses), "quantized_layers": quantized_layers(model)}
