"""Exact greedy decoding without streaming the whole float head: screen it with an 8-bit copy.

A float32 head is a large share of the bytes a small model reads per token (SmolLM2-135M: 113 of
538 MB). For greedy decoding only its argmax matters, so the C++ step first computes the logits of
an 8-bit copy of the head (28 MB), bounds how far each can be from the float logit (the rounding
of the weights, of the kernel's integer input, and float rounding in both), keeps the rows whose
interval reaches the best lower bound (a few per token), and computes those rows' float logits
exactly as the full head does. The pick is the float head's argmax, bit for bit, first index of
ties included; a row the screen cannot decide (too many candidates, non-finite values) falls back
to the full float head.
"""

from __future__ import annotations

import torch
from torch import nn

from nibble.kernels.reference import expand_groups, unpack_rows
from nibble.runtime.head import round_head

SCREEN_BITS = 8
ROWS_PER_CHUNK = 4096  # bounds are computed this many head rows at a time (temporaries stay small)


def screen_tensors(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The rounded head and the per-row bounds for screening the float head ``weight`` [vocab, hidden].

    The scalar kernel computes a row's logit as ``Σ s·q·ĥ − s·z·Σh`` with ``ĥ`` the input rounded to
    14-bit integers, so it differs from the float logit ``Σ w·h`` by at most
    ``weight_error·|h|₁ + code_sum·max|ĥ − h|`` plus float rounding, where ``weight_error`` is
    max |w − ŵ| and ``code_sum`` is Σ s·q (the coefficients on ``ĥ``). ``magnitude`` bounds, per unit
    of |h|₁, the terms either computation adds up (s·(largest code + |z|) for the kernel, max |w|
    for the float dot), which sizes the float-rounding allowance.
    """
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.data = weight.detach().float()
    if bias is not None:
        linear.bias.data = bias.detach().float()
    rounded = round_head(linear, SCREEN_BITS, group_size=-1)
    zeros = rounded.zero_points().float()
    parts = [_row_bounds(rounded, zeros, linear.weight.data, rows)
             for rows in torch.arange(weight.shape[0]).split(ROWS_PER_CHUNK)]
    bounds = {name: torch.cat([part[name] for part in parts]).contiguous() for name in parts[0]}
    return rounded, bounds


def _row_bounds(rounded, zeros: torch.Tensor, exact: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bounds of head rows ``rows`` (see ``screen_tensors``)."""
    codes = unpack_rows(rounded.qweight[rows], rounded.bits, rounded.in_features).float()
    scales, zeros = rounded.scales[rows].float(), zeros[rows]
    per_input = expand_groups(scales, rounded.group_size, rounded.in_features)
    approx = per_input * (codes - expand_groups(zeros, rounded.group_size, rounded.in_features))
    exact = exact[rows]
    largest_code = 2 ** rounded.bits - 1
    return {
        "weight_error": (exact - approx).abs().amax(1),
        "code_sum": (per_input * codes).sum(1),
        "magnitude": (scales * (largest_code + zeros.abs())).amax(1) + exact.abs().amax(1),
    }


def max_candidates(vocab: int) -> int:
    """Candidates a row may keep before the step computes its whole float head instead."""
    return max(64, vocab // 64)
