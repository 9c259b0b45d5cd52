"""Seeded sampling of fixed-length token windows for calibration and validation."""

from __future__ import annotations

import torch

from nibble.errors import DatasetError


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Draw ``nsamples`` windows of ``seqlen`` tokens at random offsets (seeded); shape [n, seqlen]."""
    if token_ids.numel() <= seqlen:
        raise DatasetError(f"corpus has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()])


def split_windows(windows: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split windows into (train, held-out) with the last ``holdout`` rows held out."""
    if not 0 <= holdout < windows.shape[0]:
        raise DatasetError(f"cannot hold out {holdout} of {windows.shape[0]} windows")
    return windows[: windows.shape[0] - holdout], windows[windows.shape[0] - holdout :]
