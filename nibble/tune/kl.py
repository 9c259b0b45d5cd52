"""Token-level KL(teacher ‖ student) from final hidden states, chunked over rows and vocabulary.

The logits ``h @ Wᵀ + b`` of a whole batch (tokens × vocabulary) are never materialised: the
forward pass streams over blocks of ``rows`` tokens and ``cols`` vocabulary entries keeping, per
token, a running maximum, a running sum of exponentials and a running Σ exp(z_t)·(z_t − z_s) (an
online log-sum-exp, as in flash attention). The backward pass streams over the same blocks again
and accumulates the gradients of the student's hidden states, head weight and bias:
∂KL/∂z_s = p_s − p_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_ROWS = 512
DEFAULT_COLS = 16384


@dataclass
class Head:
    """An output projection (``logits = hidden @ weight.T + bias``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, model: nn.Module) -> "Head":
        """The output embedding of a transformers causal LM."""
        head = model.get_output_embeddings()
        return cls(head.weight, getattr(head, "bias", None))

    def logits(self, hidden: torch.Tensor, cols: slice = slice(None)) -> torch.Tensor:
        z = hidden.float() @ self.weight[cols].float().T
        return z if self.bias is None else z + self.bias[cols].float()


class _Running:
    """Online log-sum-exp of one set of logits, with an optional weighted sum riding along."""

    def __init__(self, rows: int, device: torch.device):
        self.max = torch.full((rows,), -torch.inf, device=device)
        self.sum = torch.zeros(rows, device=device)
        self.weighted = torch.zeros(rows, device=device)

    def add(self, z: torch.Tensor, values: torch.Tensor | None = None) -> None:
        new_max = torch.maximum(self.max, z.max(dim=-1).values)
        rescale = torch.exp(self.max - new_max)
        e = torch.exp(z - new_max[:, None])
        self.sum = self.sum * rescale + e.sum(-1)
        if values is not None:
            self.weighted = self.weighted * rescale + (e * values).sum(-1)
        self.max = new_max

    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)


def _blocks(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _kl_rows(hs: torch.Tensor, head_s: Head, ht: torch.Tensor, head_t: Head, cols: int):
    """Per-token KL and the two log-sum-exps for one block of rows."""
    vocab = head_s.weight.shape[0]
    student, teacher = _Running(hs.shape[0], hs.device), _Running(hs.shape[0], hs.device)
    for c in _blocks(vocab, cols):
        zs, zt = head_s.logits(hs, c), head_t.logits(ht, c)
        student.add(zs)
        teacher.add(zt, zt - zs)
    lse_s, lse_t = student.lse(), teacher.lse()
    return teacher.weighted / teacher.sum - lse_t + lse_s, lse_s, lse_t


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, rows, cols):
        head_s, head_t = Head(ws, bs), Head(wt, bt)
        total = torch.zeros((), dtype=torch.float64, device=hs.device)
        lses = []
        for r in _blocks(hs.shape[0], rows):
            kl, lse_s, lse_t = _kl_rows(hs[r], head_s, ht[r], head_t, cols)
            total += kl.double().sum()
            lses.append((lse_s, lse_t))
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
        ctx.lses, ctx.rows, ctx.cols = lses, rows, cols
        return total.float()

    @staticmethod
    def backward(ctx, grad_out):
        hs, ws, bs, ht, wt, bt = ctx.saved_tensors
        head_s, head_t = Head(ws, bs), Head(wt, bt)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hs, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(ws, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bs, dtype=torch.float32) if need_b and bs is not None else None
        for r, (lse_s, lse_t) in zip(_blocks(hs.shape[0], ctx.rows), ctx.lses):
            h = hs[r].float()
            for c in _blocks(ws.shape[0], ctx.cols):
                dz = torch.exp(head_s.logits(hs[r], c) - lse_s[:, None])
                dz -= torch.exp(head_t.logits(ht[r], c) - lse_t[:, None])
                dz *= grad_out
                if grad_h is not None:
                    grad_h[r] += dz @ ws[c].float()
                if grad_w is not None:
                    grad_w[c] += dz.T @ h
                if grad_b is not None:
                    grad_b[c] += dz.sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(grad_h, hs), cast(grad_w, ws), cast(grad_b, bs), None, None, None, None, None


def chunked_kl(student_hidden: torch.Tensor, student_head: Head, teacher_hidden: torch.Tensor,
               teacher_head: Head, rows: int = DEFAULT_ROWS, cols: int = DEFAULT_COLS) -> torch.Tensor:
    """Σ over tokens of KL(p_teacher ‖ p_student); hidden states [..., d], heads [vocab, d].

    Differentiable w.r.t. the student's hidden states, head weight and bias; memory is
    O(rows × cols) on top of the inputs.
    """
    if student_head.weight.shape[0] != teacher_head.weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_head.weight.shape[0]} "
                         f"vs {teacher_head.weight.shape[0]}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    return _ChunkedKL.apply(hs, student_head.weight, student_head.bias, ht, teacher_head.weight.detach(),
                            None if teacher_head.bias is None else teacher_head.bias.detach(), rows, cols)


@torch.no_grad()
def chunked_nll(hidden: torch.Tensor, head: Head, targets: torch.Tensor, rows: int = DEFAULT_ROWS,
                cols: int = DEFAULT_COLS) -> torch.Tensor:
    """Σ over tokens of −log p(target) (float64), without materialising the logits."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for r in _blocks(h.shape[0], rows):
        running = _Running(r.stop - r.start, h.device)
        for c in _blocks(head.weight.shape[0], cols):
            running.add(head.logits(h[r], c))
        target_logit = (h[r].float() * head.weight[t[r]].float()).sum(-1)
        if head.bias is not None:
            target_logit = target_logit + head.bias[t[r]].float()
        total += (running.lse() - target_logit).double().sum()
    return total


def kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of KL(p_teacher ‖ p_student) from dense logits (for tests and small models)."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum()
