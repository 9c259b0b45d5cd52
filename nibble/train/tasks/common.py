"""Shared training machinery for the tasks: seeding, the optimizer, the timed training loop."""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

WARMUP_STEPS_UNTIMED = 3  # the first steps pay one-off costs (allocation, PACT init)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, total_steps: int,
                   warmup: float = 0.05) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over every parameter (PACT clips included) with linear warmup and cosine decay."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainLog:
    """Per-step losses and step times (forward, backward and optimizer step): wall clock and the
    process's CPU time, which other jobs on a shared machine hardly inflate."""

    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    step_cpu_times: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    @property
    def step_time(self) -> float:
        """Median wall-clock step time in seconds, the first few steps excluded."""
        return _median_after_warmup(self.step_times)

    @property
    def step_cpu_time(self) -> float:
        """Median CPU time of a step in seconds (all threads), the first few steps excluded."""
        return _median_after_warmup(self.step_cpu_times)


def _median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[WARMUP_STEPS_UNTIMED:] or times)


def train_steps(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                optimizer: torch.optim.Optimizer, scheduler, total: int, desc: str,
                progress: bool = True, log: TrainLog | None = None) -> TrainLog:
    """Run one optimizer step per batch, timing each; stops on a non-finite loss."""
    log = log or TrainLog()
    model.train()
    bar = tqdm(batches, total=total, desc=desc, disable=not progress, leave=False)
    for inputs, targets in bar:
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        log.step_times.append(time.perf_counter() - start)
        log.step_cpu_times.append(time.process_time() - start_cpu)
        log.losses.append(float(loss.detach()))
        if not math.isfinite(log.losses[-1]):
            break
        bar.set_postfix(loss=f"{log.losses[-1]:.3f}", refresh=False)
    return log
