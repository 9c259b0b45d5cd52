"""The GPU decode step: one token per row replayed from a CUDA graph instead of ~10 eager ops per layer.

A captured graph replays fixed kernels on fixed memory, so everything a token changes lives in
static device buffers (the token ids, the cache slot, the rows' pad counts) and attention reads a
fixed number of cache slots with the unwritten ones masked. Graphs are captured lazily, one per
attended length bucket (64, 128, 256, ... up to the cache's ``max_len``), so a short generation
does not attend to the whole cache. Prompts (several tokens per row) run eagerly.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

import torch

from nibble.runtime.engine import StepInput
from nibble.runtime.kv_cache import StaticKVCache

log = logging.getLogger(__name__)

MIN_BUCKET = 64
T = TypeVar("T")


def length_bucket(slot: int, max_len: int) -> int:
    """Cache slots attended by a token written at ``slot``: the power of two (>= 64) above it, capped."""
    bucket = MIN_BUCKET
    while bucket <= slot:
        bucket *= 2
    return min(bucket, max_len)


class GraphedDecodeStep:
    """Wraps a step that has ``decode_masked`` (``LlamaTorchStep``); ``decode_token`` is the lean path.

    With ``capture=False`` the same static-shape computation runs eagerly (any device): what the
    graphs replay, checkable on a CPU.
    """

    def __init__(self, step, cache: StaticKVCache, capture: bool = True):
        if capture and cache.data.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and its cache on a CUDA device")
        self.step = step
        self.cache = cache
        self.capture = capture
        device = cache.data.device
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.pads = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def __call__(self, batch: StepInput, cache: StaticKVCache, all_logits: bool = False) -> torch.Tensor:
        """Any feed through ``DecodeRuntime.feed`` (prompts, checks): the wrapped step, eagerly."""
        return self.step(batch, cache, all_logits)

    @torch.inference_mode()
    def decode_token(self, tokens: Sequence[int], start: int, pad_lengths: torch.Tensor,
                     sampler: Callable[[torch.Tensor], torch.Tensor]) -> list[int]:
        """Write one token per row at cache slot ``start`` and return ``sampler``'s picks."""
        self.tokens.copy_(torch.tensor(tokens, dtype=torch.long).view(-1, 1))
        self.slot.fill_(start)
        self.pads.copy_(pad_lengths)
        return sampler(self._logits(length_bucket(start, self.cache.max_len))).tolist()

    def _forward(self, length: int) -> torch.Tensor:
        return self.step.decode_masked(self.tokens, self.slot, self.pads, length, self.cache)

    def _logits(self, length: int) -> torch.Tensor:
        if not self.capture:
            return self._forward(length)
        if length not in self.graphs:
            try:
                self.graphs[length] = self._capture(length)
            except RuntimeError as exc:  # a kernel that syncs with the host cannot be captured
                log.warning("CUDA graph capture failed (%s); decoding eagerly", exc)
                self.capture = False
                return self._forward(length)
        graph, logits = self.graphs[length]
        graph.replay()
        return logits

    def _capture(self, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph, logits = capture_graph(lambda: self._forward(length), self._pool)
        self._pool = graph.pool()  # the graphs share one memory pool
        return graph, logits


def capture_graph(fn: Callable[[], T], pool=None, warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` recorded as a CUDA graph, and its output (rewritten by each replay).

    ``fn`` first runs ``warmups`` times on a side stream (kernel choices, autotuning, workspaces stay
    out of the graph); its writes must be ones a replay may repeat.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output
