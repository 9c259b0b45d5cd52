"""Perplexity with the protocol of the GPTQ / AQLM / QuIP# tables.

The corpus is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (the tail
is dropped); every window is scored independently and the reported figure is
``exp(mean NLL)`` over every predicted token (``seqlen - 1`` per window).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nibble.data.corpus import load_text, tokenize_corpus
from nibble.errors import DatasetError, NonFiniteError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    windows: int
    tokens: int
    seqlen: int
    dataset: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def windows_of(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] from the start of ``token_ids``, tail dropped."""
    count = token_ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DatasetError(f"corpus has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    return token_ids[: count * seqlen].view(count, seqlen)


def window_nll(logits: torch.Tensor, window: torch.Tensor, vocab_chunk: int = 512) -> torch.Tensor:
    """Summed next-token NLL of one batch of windows, computed in float32 in row chunks."""
    total = torch.zeros((), dtype=torch.float64)
    shifted, targets = logits[:, :-1], window[:, 1:]
    for start in range(0, shifted.shape[1], vocab_chunk):
        chunk = shifted[:, start : start + vocab_chunk].float()
        total += F.cross_entropy(chunk.flatten(0, 1), targets[:, start : start + vocab_chunk].flatten(),
                                 reduction="sum").double().cpu()
    return total


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = True,
               dataset: str = "") -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` (1-D) with non-overlapping windows."""
    device = next(model.parameters()).device
    windows = windows_of(token_ids, seqlen, max_windows)
    total_nll = torch.zeros((), dtype=torch.float64)
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=f"perplexity {dataset}".strip(),
               disable=not progress, unit="batch")
    for start in bar:
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = window_nll(logits, batch)
        if not torch.isfinite(nll):
            raise NonFiniteError(f"non-finite loss on window {start}: the model produces NaN or Inf")
        total_nll += nll
        scored = min(start + batch_size, windows.shape[0]) * (seqlen - 1)
        bar.set_postfix(ppl=f"{math.exp(total_nll.item() / scored):.3f}")
    predicted = windows.shape[0] * (seqlen - 1)
    mean_nll = (total_nll / predicted).item()
    return PerplexityResult(math.exp(mean_nll), mean_nll, windows.shape[0], predicted, seqlen, dataset)


def perplexity_on_dataset(model: nn.Module, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048,
                          max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    """Load ``dataset`` (``wikitext2``, ``c4`` or a text file), tokenize it and score ``model``."""
    token_ids = tokenize_corpus(tokenizer, load_text(dataset, "test"))
    return perplexity(model, token_ids, seqlen, max_windows, progress=progress, dataset=dataset)
