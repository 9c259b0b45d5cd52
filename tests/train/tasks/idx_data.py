"""Synthetic IDX files shaped like Fashion-MNIST, for the task and CLI tests."""

import gzip
from pathlib import Path

import torch


def write_idx(path: Path, data: torch.Tensor) -> Path:
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(n.to_bytes(4, "big") for n in data.shape)
    payload = header + data.to(torch.uint8).numpy().tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def synthetic_fashion(folder: Path, train: int = 256, test: int = 64) -> Path:
    """Ten classes of stripes (period 2..6, horizontal or vertical) under noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = torch.arange(28)
    for prefix, count, gz in (("train", train, True), ("t10k", test, False)):
        labels = torch.arange(count) % 10
        images = torch.randint(0, 60, (count, 28, 28))
        for i, label in enumerate(labels.tolist()):
            stripes = (rows % (2 + label // 2) == 0)
            mask = stripes[:, None] if label % 2 else stripes[None, :]
            images[i] = torch.where(mask.expand(28, 28), 250, images[i])
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder
