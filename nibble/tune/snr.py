"""How much of a weight gradient is signal: the V step's limit at a given batch size.

A V step moves a group's codes when its gradient points consistently, so what matters is the
signal-to-noise ratio of dL/dŴ per group at the tokens of one step. From K gradients of one
weight, each on an independent batch of T tokens:

- noise: the per-sample variance summed over the elements, N = Σ var(g) (it scales as 1/T);
- signal: the squared norm of the expected gradient, S = ‖mean(g)‖² − N/K (unbiased: the
  squared norm of a K-sample mean carries N/K of noise).

The ratio at a batch of ``tokens`` is S / (N·T/tokens), and S/N·T tokens give a ratio of 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nibble.tune.vstep import group_sq_norms, group_view


class GradientMoments:
    """Running sums of the gradient samples of one weight (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, grad: torch.Tensor) -> None:
        g = grad.detach().double()
        if self.total is None:
            self.total, self.squares = g.clone(), g * g
        else:
            self.total += g
            self.squares.addcmul_(g, g)
        self.count += 1

    def mean_and_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element sample mean and unbiased variance (needs two samples or more)."""
        if self.count < 2:
            raise ValueError("the variance needs at least two gradient samples")
        mean = self.total / self.count
        variance = ((self.squares - self.count * mean * mean) / (self.count - 1)).clamp_(min=0)
        return mean, variance


@dataclass
class GradientSNR:
    """Signal and noise energy of one weight's (or several weights') gradient samples."""

    signal: float           # ‖E g‖², unbiased estimate (may come out < 0 when there is none)
    noise: float            # E‖g − E g‖² of one sample
    tokens: int             # tokens behind one sample
    group_signal: torch.Tensor  # per group: ‖E g‖² estimate
    group_noise: torch.Tensor   # per group: per-sample noise energy

    def ratio(self, tokens: int) -> float:
        """Signal / noise energy of a gradient over ``tokens`` tokens."""
        return self.signal / (self.noise * self.tokens / tokens)

    def tokens_for_ratio(self, ratio: float = 1.0) -> float:
        """Tokens per gradient at which the signal energy is ``ratio`` times the noise (inf without signal)."""
        return float("inf") if self.signal <= 0 else ratio * self.noise * self.tokens / self.signal

    def groups_above(self, tokens: int, ratio: float = 1.0) -> float:
        """Fraction of groups whose own signal/noise ratio exceeds ``ratio`` at ``tokens`` per gradient."""
        scaled_noise = self.group_noise * self.tokens / tokens
        return float((self.group_signal > ratio * scaled_noise).double().mean())

    @staticmethod
    def combine(parts: list["GradientSNR"]) -> "GradientSNR":
        """Several weights (with the same tokens per sample) as one."""
        if len({p.tokens for p in parts}) != 1:
            raise ValueError("cannot combine gradient statistics taken at different batch sizes")
        return GradientSNR(sum(p.signal for p in parts), sum(p.noise for p in parts), parts[0].tokens,
                           torch.cat([p.group_signal.flatten() for p in parts]),
                           torch.cat([p.group_noise.flatten() for p in parts]))


def gradient_snr(moments: GradientMoments, group_shape: tuple[int, int], tokens: int) -> GradientSNR:
    """The signal and noise of ``moments`` (samples of ``tokens`` tokens each), also per group."""
    mean, variance = moments.mean_and_variance()
    group_noise = group_view(variance, group_shape).sum(dim=(1, 3))
    group_signal = group_sq_norms(mean, group_shape) - group_noise / moments.count
    return GradientSNR(float(group_signal.sum()), float(group_noise.sum()), tokens, group_signal, group_noise)
