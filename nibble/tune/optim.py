"""A small Adam / LAMB whose state is a flat dict of named tensors (saved as safetensors)."""

from __future__ import annotations

import torch


class NamedAdam:
    """Adam (or LAMB with ``lamb=True``) over named tensors; ``state_tensors`` round-trips exactly.

    LAMB rescales each tensor's Adam update to ``‖p‖ / ‖update‖`` times the learning rate
    (You et al., 2020), which makes one learning rate fit tensors of very different scales.
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 lamb: bool = False):
        self.lr, self.betas, self.eps, self.lamb = lr, betas, eps, lamb
        self.exp_avg: dict[str, torch.Tensor] = {}
        self.exp_avg_sq: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}

    def direction(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Update the moments of ``name`` with ``grad``; the bias-corrected Adam direction m̂ / (√v̂ + ε)."""
        beta1, beta2 = self.betas
        if name not in self.exp_avg:
            self.exp_avg[name] = torch.zeros_like(grad, dtype=torch.float32)
            self.exp_avg_sq[name] = torch.zeros_like(grad, dtype=torch.float32)
            self.steps[name] = 0
        self.steps[name] += 1
        t = self.steps[name]
        m, v = self.exp_avg[name], self.exp_avg_sq[name]
        m.mul_(beta1).add_(grad.float(), alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad.float(), grad.float(), value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(self.eps)
        return (m / (1 - beta1**t)) / denom

    @torch.no_grad()
    def step(self, params: dict[str, torch.nn.Parameter]) -> None:
        """One update of every parameter that has a gradient."""
        for name, p in params.items():
            if p.grad is None:
                continue
            update = self.direction(name, p.grad)
            scale = self.lr
            if self.lamb:
                p_norm, u_norm = p.detach().float().norm(), update.norm()
                if p_norm > 0 and u_norm > 0:
                    scale = self.lr * (p_norm / u_norm).item()
            p.add_(update.to(p.dtype), alpha=-scale)

    # --- checkpointing ------------------------------------------------------------------------
    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.exp_avg:
            out[f"{prefix}{name}::m"] = self.exp_avg[name]
            out[f"{prefix}{name}::v"] = self.exp_avg_sq[name]
            out[f"{prefix}{name}::t"] = torch.tensor(self.steps[name], dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for key, value in tensors.items():
            if not key.startswith(prefix):
                continue
            name, part = key[len(prefix):].rsplit("::", 1)
            if part == "m":
                self.exp_avg[name] = value.float().clone()
            elif part == "v":
                self.exp_avg_sq[name] = value.float().clone()
            else:
                self.steps[name] = int(value)
