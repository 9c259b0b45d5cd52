"""A static, pre-allocated key/value cache: one tensor, written in place, never re-allocated."""

from __future__ import annotations

import torch

from nibble.errors import NibbleError


class KVCacheFullError(NibbleError):
    """More tokens were fed than the cache was allocated for."""


class StaticKVCache:
    """Keys and values of every layer in one tensor ``[layers, 2, batch, kv_heads, max_len, head_dim]``.

    ``length`` counts the positions already written (the same for every row of the batch).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.data = torch.zeros(num_layers, 2, batch_size, num_kv_heads, max_len, head_dim,
                                dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.data.shape[4]

    @property
    def batch_size(self) -> int:
        return self.data.shape[2]

    def reset(self) -> None:
        """Forget every position (the memory is kept and overwritten later)."""
        self.length = 0

    def reserve(self, num_tokens: int) -> int:
        """Check that ``num_tokens`` more positions fit and return the first free slot."""
        if num_tokens < 1:
            raise ValueError("at least one token must be fed")
        if self.length + num_tokens > self.max_len:
            raise KVCacheFullError(
                f"KV cache full: {self.length} + {num_tokens} tokens exceed max_len {self.max_len}"
            )
        return self.length

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(keys, values)`` of layer ``index``, each ``[batch, kv_heads, max_len, head_dim]``."""
        return self.data[index, 0], self.data[index, 1]
