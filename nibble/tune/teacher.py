"""The teacher's side of the loss: final hidden states, computed on the fly or cached on disk.

Caching the final hidden states (d numbers per token) instead of the logits (vocabulary-size
numbers per token) costs ~100× less disk; the teacher's logits are recomputed from them and the
teacher's output head inside the chunked KL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nibble.errors import ConfigError
from nibble.formats.checkpoint import load_tensors, save_tensors_atomic
from nibble.tune.kl import Head

log = logging.getLogger(__name__)


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states that a causal LM's output head reads (after the final norm)."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse teacher/student pairs whose logits cannot be compared token by token."""
    vs, vt = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise ConfigError(f"teacher vocabulary ({vt}) differs from the student's ({vs})")
    for model in (student, teacher):
        if getattr(model.config, "final_logit_softcapping", None):
            raise ConfigError("models with final logit soft-capping are not supported by the KL loss")


class TeacherOutputs:
    """Teacher hidden states by window index; ``cache_dir`` keeps them on disk (float16 or float32)."""

    def __init__(self, teacher: nn.Module, windows: torch.Tensor, cache_dir: Path | None = None,
                 cache_dtype: torch.dtype = torch.float32):
        self.teacher = teacher
        self.head = Head(teacher.get_output_embeddings().weight.detach(),
                         None if getattr(teacher.get_output_embeddings(), "bias", None) is None
                         else teacher.get_output_embeddings().bias.detach())
        self.windows = windows
        self.cache_dir = cache_dir
        self.cache_dtype = cache_dtype
        self.device = teacher.get_output_embeddings().weight.device
        self.memory: dict[int, torch.Tensor] = {}

    def _path(self, index: int) -> Path:
        return self.cache_dir / f"window_{index:06d}.safetensors"

    @torch.no_grad()
    def compute(self, indices: list[int]) -> torch.Tensor:
        """Teacher final hidden states [len(indices), seqlen, d], computed now."""
        return final_hidden(self.teacher, self.windows[indices].to(self.device)).float()

    def fill_cache(self, indices: list[int], batch_size: int = 1, progress: bool = True) -> None:
        """Write the cache files of ``indices`` that are not on disk yet."""
        missing = [i for i in indices if not self._path(i).is_file()]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for start in tqdm(range(0, len(missing), batch_size), desc="teacher cache", disable=not progress):
            batch = missing[start : start + batch_size]
            hidden = self.compute(batch)
            for index, h in zip(batch, hidden):
                save_tensors_atomic({"hidden": h.to(self.cache_dtype)}, self._path(index))

    def remember(self, indices: list[int]) -> None:
        """Compute the hidden states of ``indices`` now and keep them in memory (small sets only)."""
        for index in indices:
            self.memory[index] = self.compute([index])[0]

    def get(self, indices: list[int]) -> torch.Tensor:
        """Teacher final hidden states [len(indices), seqlen, d] (float32, on the teacher's device)."""
        if all(i in self.memory for i in indices):
            return torch.stack([self.memory[i] for i in indices])
        if self.cache_dir is None:
            return self.compute(indices)
        return torch.stack([load_tensors(self._path(i))["hidden"] for i in indices]).to(self.device, torch.float32)

    def release_model(self) -> None:
        """Drop the teacher's blocks once everything needed is cached; only its head is kept."""
        self.teacher = None
