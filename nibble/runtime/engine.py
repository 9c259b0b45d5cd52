"""``DecodeRuntime``: a model's decode step plus its static KV cache and position bookkeeping."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from nibble.errors import ConfigError, UnsupportedArchitectureError
from nibble.runtime.kv_cache import StaticKVCache
from nibble.runtime.native import NativeUnavailable
from nibble.runtime.sampling import Sampler

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpp", "torch", "graph")
SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class StepInput:
    """One call's tokens ``[batch, T]`` and where they go.

    Their keys and values are written to cache slots ``start .. start+T-1``; ``positions`` [batch, T]
    are the RoPE positions; ``mask`` is a boolean ``[batch, 1, T, start+T]`` (True = attend), or None:
    then every cached key is seen (T == 1) or attention is causal (``causal``). ``pad_lengths`` [batch]
    counts the leading pad slots of each row.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    start: int
    mask: torch.Tensor | None
    causal: bool
    pad_lengths: torch.Tensor


class DecodeStep(Protocol):
    """What an architecture provides: logits for ``batch.tokens``, keys/values written to ``cache``.

    Logits are ``[batch, vocab]`` at the last position, or ``[batch, T, vocab]`` with ``all_logits``.
    """

    def __call__(self, batch: StepInput, cache: StaticKVCache, all_logits: bool = False) -> torch.Tensor: ...


class DecodeRuntime:
    """Feeds tokens through ``step`` while keeping the cache, positions and padding mask consistent.

    Rows of a batch may be left-padded: ``start(pad_lengths)`` names how many leading slots of each
    row are padding; those slots are never attended to and positions start after them.
    """

    def __init__(self, step: DecodeStep, cache: StaticKVCache, backend: str):
        self.step = step
        self.cache = cache
        self.backend = backend
        self.device = cache.data.device
        self.pad_lengths = torch.zeros(cache.batch_size, dtype=torch.long, device=self.device)
        self.padded = False

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def start(self, pad_lengths: Sequence[int] | None = None) -> None:
        """Empty the cache for a new sequence batch, with ``pad_lengths`` leading pad slots per row."""
        self.cache.reset()
        pads = [0] * self.batch_size if pad_lengths is None else list(pad_lengths)
        if len(pads) != self.batch_size:
            raise ValueError(f"{len(pads)} pad lengths for a batch of {self.batch_size}")
        self.pad_lengths = torch.tensor(pads, dtype=torch.long, device=self.device)
        self.padded = any(p > 0 for p in pads)

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (later ones are overwritten by the next feed)."""
        if not 0 <= length <= self.cache.length:
            raise ValueError(f"cannot rewind to {length}: the cache holds {self.cache.length} positions")
        self.cache.length = length

    @contextlib.contextmanager
    def token_loop(self) -> Iterator[None]:
        """Context for a loop of one-token feeds. With the C++ step, whose own threads do the work,
        torch's ops between steps (sampling, small copies) run on one thread: a parallel torch op
        would wake torch's OpenMP workers, which then spin for milliseconds on the cores the step's
        threads need (measured: a fifth of the CPU time of a 2-thread decode, and no speed-up
        from the second thread)."""
        if self.backend != "cpp":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run ``tokens`` [batch, T] (or [batch]) and return logits at the last position [batch, vocab].

        With ``all_logits`` the result is ``[batch, T, vocab]``.
        """
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        if tokens.shape[0] != self.batch_size:
            raise ValueError(f"batch of {tokens.shape[0]} rows fed to a runtime built for {self.batch_size}")
        steps = tokens.shape[1]
        start = self.cache.reserve(steps)
        slots = torch.arange(start, start + steps, device=self.device)
        positions, mask, causal = self._positions_and_mask(slots, start, steps)
        batch = StepInput(tokens.to(self.device), positions, start, mask, causal, self.pad_lengths)
        logits = self.step(batch, self.cache, all_logits)
        self.cache.length = start + steps
        return logits

    def next_tokens(self, tokens: Sequence[int], sampler: Sampler) -> list[int]:
        """Feed one token per row and return ``sampler``'s pick of the next token of each row.

        What a generation loop does per token: ``sampler(feed(tokens))``, through the step's lean
        path when it has one (the C++ step: no torch op between steps for greedy decoding).
        """
        if len(tokens) != self.batch_size:
            raise ValueError(f"batch of {len(tokens)} rows fed to a runtime built for {self.batch_size}")
        lean = getattr(self.step, "decode_token", None)
        if lean is None:
            with torch.inference_mode():
                return sampler(self.feed(torch.tensor(tokens, device=self.device))).tolist()
        start = self.cache.reserve(1)
        picked = lean(tokens, start, self.pad_lengths, sampler)
        self.cache.length = start + 1
        return picked

    def _positions_and_mask(self, slots: torch.Tensor, start: int, steps: int):
        """``(positions [batch, T], mask or None, causal)`` for tokens going to cache ``slots``."""
        if not self.padded:
            positions = slots[None].expand(self.batch_size, steps)
            if steps == 1 or start == 0:
                return positions, None, steps > 1
            keys = torch.arange(start + steps, device=self.device)
            return positions, (keys[None, :] <= slots[:, None])[None, None], False
        positions, visible = padded_attention(slots, self.pad_lengths, start + steps)
        return positions, visible, False


def padded_attention(slots: torch.Tensor, pads: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions ``[batch, T]`` of tokens written at cache ``slots`` [T] in rows with ``pads``
    [batch] leading pad slots, and which of the first ``length`` slots each may attend to, as a
    boolean ``[batch, 1, T, length]`` mask: its row's slots from the first real one up to its own
    (a pad row sees itself, so no softmax is empty)."""
    keys = torch.arange(length, device=slots.device)
    positions = (slots[None] - pads[:, None]).clamp(min=0)
    visible = (keys <= slots[:, None]) & (keys >= pads[:, None, None])
    visible |= keys == slots[:, None]
    return positions, visible[:, None]


def build_runtime(model: nn.Module, max_len: int = 2048, batch_size: int = 1, backend: str = "auto",
                  fuse: bool = True, threads: int | None = None, screen_head: bool = True) -> DecodeRuntime:
    """A ``DecodeRuntime`` for ``model`` with a cache of ``max_len`` positions for ``batch_size`` rows.

    ``backend``: ``torch`` (eager ops, any device), ``cpp`` (fused C++ step, CPU, float32), ``graph``
    (one-token steps replayed from CUDA graphs, GPU) or ``auto`` (``graph`` on a GPU, ``cpp`` when
    possible, else ``torch``). ``fuse`` concatenates QKV and gate/up weights of plain linears.
    ``threads`` for the C++ step (default ``torch.get_num_threads()``). ``screen_head``: greedy
    steps of the C++ step find a float head's argmax through an 8-bit copy of it (exact; see
    ``nibble.runtime.screen``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    model_type = getattr(model.config, "model_type", type(model).__name__)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_len > limit:
        max_len = limit
    arch = _architecture(model, model_type, max_len, fuse, threads, screen_head)
    shape = arch.shape
    parameter = next(model.parameters())
    cache = StaticKVCache(shape.num_layers, batch_size, shape.num_kv_heads, max_len, shape.head_dim,
                          dtype=_activation_dtype(model), device=parameter.device)
    on_gpu = parameter.device.type == "cuda"
    if backend == "graph" or (backend == "auto" and on_gpu):
        if not on_gpu:
            raise ConfigError(f"the graph backend replays CUDA graphs; this model is on {parameter.device}")
        from nibble.runtime.graphs import GraphedDecodeStep

        return DecodeRuntime(GraphedDecodeStep(arch.make_torch(), cache), cache, "graph")
    if backend != "torch":
        try:
            if arch.make_native is None:
                raise NativeUnavailable(f"no C++ decode step for {model_type}")
            return DecodeRuntime(arch.make_native(cache), cache, "cpp")
        except NativeUnavailable as exc:
            if backend == "cpp":
                raise
            log.info("using the torch backend: %s", exc)
    return DecodeRuntime(arch.make_torch(), cache, "torch")


@dataclass
class Architecture:
    """How to build the decode steps of one model: its shape and two step factories."""

    shape: Any
    make_torch: Callable[[], DecodeStep]
    make_native: Callable[[StaticKVCache], DecodeStep] | None


def _architecture(model: nn.Module, model_type: str, max_len: int, fuse: bool,
                  threads: int | None, screen_head: bool) -> Architecture:
    """The decode steps for ``model``, or ``UnsupportedArchitectureError`` naming what is supported."""
    from nibble.runtime import llama

    if model_type in llama.LLAMA_FAMILY:
        from nibble.runtime.llama_native import LlamaNativeStep

        llama.check_llama_config(model.config, max_len)
        return Architecture(llama.llama_shape(model), lambda: llama.LlamaTorchStep(model, max_len, fuse),
                            lambda cache: LlamaNativeStep(model, max_len, cache, fuse, threads, screen_head))
    raise UnsupportedArchitectureError(
        f"the decode runtime does not support {model_type!r} models; supported: {', '.join(SUPPORTED)}"
    )


def _activation_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32
