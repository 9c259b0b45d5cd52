"""Token generation over a ``DecodeRuntime``: prefill once, then one ``next_tokens`` call per new token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from nibble.runtime.engine import DecodeRuntime
from nibble.runtime.sampling import Sampler, SamplingConfig

TokenCallback = Callable[[int, int], None]  # (row, token id)


@dataclass
class GenerationResult:
    """New tokens per row (stop token included when one was produced) and the timings.

    ``prefill_seconds`` covers feeding the prompt and choosing the first token; ``decode_seconds``
    covers every later token, whose count per row is ``decode_steps``.
    """

    tokens: list[list[int]]
    prompt_tokens: int
    prefill_seconds: float
    decode_steps: int = 0
    decode_seconds: float = 0.0
    stopped: list[bool] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(row) for row in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens produced after the first one, per second, summed over rows."""
        rows = len(self.tokens)
        return rows * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``[batch, longest]`` token tensor, shorter rows padded on the left, and each row's pad count."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    rows = [[pad_id] * pad + list(p) for pad, p in zip(pads, prompts)]
    return torch.tensor(rows, dtype=torch.long), pads


def generate(runtime: DecodeRuntime, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_tokens: Iterable[int] = (),
             on_token: TokenCallback | None = None, continue_cache: bool = False) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per row after ``prompts`` (one list of ids per batch row).

    Rows stop at any of ``stop_tokens``; ``on_token`` sees each new token as it is chosen. With
    ``continue_cache`` (batch 1) the prompt is appended to what the cache already holds.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    tokens, pads = left_pad(prompts)
    if continue_cache:
        if runtime.batch_size != 1 or len(prompts) != 1:
            raise ValueError("continue_cache needs batch size 1")
    else:
        runtime.start(pads)
    max_new_tokens = min(max_new_tokens, runtime.max_len - runtime.cache.length - tokens.shape[1] + 1)
    stops = set(stop_tokens)
    sampler = Sampler(sampling, runtime.device)
    result = GenerationResult([[] for _ in prompts], sum(len(p) for p in prompts), 0.0,
                              stopped=[False] * len(prompts))
    begin = time.perf_counter()
    next_tokens = sampler(runtime.feed(tokens)).tolist()
    _record(result, next_tokens, stops, on_token)
    result.prefill_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    with runtime.token_loop():
        while result.decode_steps + 1 < max_new_tokens and not all(result.stopped):
            next_tokens = runtime.next_tokens(next_tokens, sampler)
            result.decode_steps += 1
            _record(result, next_tokens, stops, on_token)
    result.decode_seconds = time.perf_counter() - begin
    return result


def _record(result: GenerationResult, next_tokens: list[int], stops: set[int],
            on_token: TokenCallback | None) -> None:
    for row, token in enumerate(next_tokens):
        if result.stopped[row]:
            continue
        result.tokens[row].append(token)
        result.stopped[row] = token in stops
        if on_token is not None:
            on_token(row, token)
