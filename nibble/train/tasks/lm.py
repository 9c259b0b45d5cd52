"""A small decoder-only transformer trained on C4 text; reports WikiText-2 perplexity.

Text is tokenized as UTF-8 bytes (vocabulary 256, no network needed), so perplexity is per
byte. Training text: ``load_text("c4", "train")``; evaluation: ``load_text("wikitext2", "test")``
cut into non-overlapping windows of ``context`` bytes (tail dropped), perplexity = exp(mean NLL)
over every predicted byte. Both are read from ``$NIBBLE_DATA``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nibble.data import load_text
from nibble.errors import DatasetError
from nibble.train.recipes import get_recipe, prepare, quantized_layers
from nibble.train.tasks.common import TrainLog, make_optimizer, seed_everything, train_steps

VOCAB = 256


def encode_bytes(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D int64 tensor (the byte-level tokenizer)."""
    data = text.encode("utf-8")
    if not data:
        raise DatasetError("the corpus is empty")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode_bytes(ids: torch.Tensor) -> str:
    """Inverse of :func:`encode_bytes` (invalid UTF-8 is replaced)."""
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head attention and a ReLU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc, self.out = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.out(F.relu(self.fc(self.norm2(x))))


class TinyLM(nn.Module):
    """Byte-level decoder-only transformer with learned positions and an untied output layer."""

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, context: int = 128):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@dataclass(frozen=True)
class LMConfig:
    epochs: int = 1
    batch_size: int = 16
    context: int = 128
    dim: int = 128
    layers: int = 2
    heads: int = 4
    lr: float = 4e-3
    weight_decay: float = 0.01
    max_steps: int | None = None  # stop early (tests, quick runs)
    eval_bytes: int | None = None  # evaluate on a prefix of WikiText-2 only


def windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens, tail dropped: ``[n, length]``."""
    count = ids.numel() // length
    if count == 0:
        raise DatasetError(f"need at least {length} tokens, got {ids.numel()}")
    return ids[:count * length].view(count, length)


def _batches(train: torch.Tensor, batch_size: int, generator: torch.Generator):
    order = torch.randperm(train.shape[0], generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chunk = train[order[start:start + batch_size]]
        yield chunk[:, :-1], chunk[:, 1:]


def _lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, context: int, batch_size: int = 32) -> float:
    """exp(mean NLL) over every predicted token of non-overlapping ``context``-token windows."""
    model.eval()
    data = windows(ids, context)
    total, count = 0.0, 0
    for start in range(0, data.shape[0], batch_size):
        chunk = data[start:start + batch_size]
        logits = model(chunk[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


Inspector = Callable[[nn.Module, int, torch.Tensor, torch.Tensor], None]


def _inspected(batches, model: nn.Module, inspect: Inspector, first_step: int):
    for step, (inputs, targets) in enumerate(batches, first_step):
        inspect(model, step, inputs, targets)
        yield inputs, targets


def run_lm(recipe: str, seed: int = 0, config: LMConfig = LMConfig(), keep: list[str] | None = None,
           progress: bool = True, inspect: Inspector | None = None) -> dict:
    """Train the tiny LM on C4 under ``recipe`` and report WikiText-2 byte perplexity.

    ``inspect(model, step, inputs, targets)``, if given, sees the model before every step.
    """
    train = windows(encode_bytes(load_text("c4", "train")), config.context + 1)
    test = encode_bytes(load_text("wikitext2", "test"))
    if config.eval_bytes:
        test = test[:config.eval_bytes]
    seed_everything(seed)
    model = TinyLM(config.dim, config.layers, config.heads, config.context)
    prepare(model, get_recipe(recipe), keep)
    steps_per_epoch = train.shape[0] // config.batch_size
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    optimizer, scheduler = make_optimizer(model, config.lr, config.weight_decay, total)
    generator = torch.Generator().manual_seed(seed)
    log = TrainLog()
    for epoch in range(config.epochs):
        budget = total - len(log.losses)
        batches = (b for _, b in zip(range(budget), _batches(train, config.batch_size, generator)))
        if inspect is not None:
            batches = _inspected(batches, model, inspect, len(log.losses))
        train_steps(model, batches, _lm_loss, optimizer, scheduler, min(budget, steps_per_epoch),
                    f"{recipe} epoch {epoch + 1}/{config.epochs}", progress, log)
        if len(log.losses) >= total:
            break
    return {"task": "lm", "recipe": recipe, "seed": seed, "epochs": config.epochs,
            "ppl": perplexity(model, test, config.context), "loss": log.final_loss,
            "step_time_s": log.step_time, "step_cpu_s": log.step_cpu_time, "steps": len(log.losses), "tokens": "utf-8 bytes",
            "eval_bytes": test.numel(),
            "quantized_layers": quantized_layers(model)}
