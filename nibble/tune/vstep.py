"""The V step: move the discrete codes of one quantized layer, in any nibble format.

Only the format contract is used: ``dequantize()`` gives the dense weight Ŵ, ``group_shape`` the
grid of groups that can be re-encoded independently, ``project_(target, mask)`` re-encodes the
masked groups onto the nearest representable values (rounding to the grid for scalar formats,
beam search for AQLM).

One step, given a target dense weight Y (Ŵ minus an optimizer step for the linearized PV update,
or the straight-through shadow weight for STE):

1. score every group by ‖Y − Ŵ‖² over the group and keep the top fraction τ (subspace step);
   or, given the loss gradient G (selection by gain), by the linearized loss decrease of the
   proposed move, ⟨G, Ŵ − Y⟩ over the group;
2. re-encode those groups towards Y; with the gradient, keep only groups whose actual change
   lowers the linearized loss (⟨G, Ŵ − Ŵ_new⟩ > 0);
3. with a trust ratio ρ, if ‖Ŵ_new − Ŵ‖ > ρ‖Ŵ‖, keep only the highest-scoring groups whose actual
   changes fit in the budget;
4. if 2 or 3 dropped groups, re-encode the kept ones again from the old codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nibble.formats.base import QuantizedLinear


@dataclass
class VStepStats:
    selected: int       # groups offered for re-encoding
    changed: int        # groups whose decoded values actually changed
    groups: int         # groups in the layer
    relative_change: float  # ‖Ŵ_new − Ŵ‖ / ‖Ŵ‖
    weight: torch.Tensor | None = field(default=None, repr=False)  # Ŵ_new


def group_view(weight: torch.Tensor, group_shape: tuple[int, int]) -> torch.Tensor:
    """``weight`` [out, in] viewed as [R, out/R, C, in/C] for a (R, C) grid of groups."""
    rows, cols = group_shape
    out_features, in_features = weight.shape
    if out_features % rows or in_features % cols:
        raise ValueError(f"group grid {group_shape} does not tile a weight of shape {tuple(weight.shape)}")
    return weight.reshape(rows, out_features // rows, cols, in_features // cols)


def expand_mask(mask: torch.Tensor, weight_shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """A group mask ``[R, C]`` as a mask of the weight's elements."""
    rows, cols = mask.shape
    out_features, in_features = weight_shape
    full = mask[:, None, :, None].expand(rows, out_features // rows, cols, in_features // cols)
    return full.reshape(out_features, in_features)


def group_sq_norms(delta: torch.Tensor, group_shape: tuple[int, int]) -> torch.Tensor:
    """Squared norm of ``delta`` in every group, shape ``group_shape``."""
    return group_view(delta.float(), group_shape).pow(2).sum(dim=(1, 3))


def group_gains(grad: torch.Tensor, decrease: torch.Tensor, group_shape: tuple[int, int]) -> torch.Tensor:
    """Linearized loss decrease ⟨grad, decrease⟩ in every group (``decrease`` = Ŵ − Ŵ_new)."""
    return group_view(grad.float() * decrease.float(), group_shape).sum(dim=(1, 3))


def top_fraction_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean mask of the ⌊τ·n⌋ largest positive scores (ties broken by position)."""
    flat = scores.flatten()
    k = min(int(tau * flat.numel()), int((flat > 0).sum()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def changed_groups(before: torch.Tensor, after: torch.Tensor, group_shape: tuple[int, int]) -> torch.Tensor:
    """Mask of groups in which any decoded value differs."""
    return group_view(before != after, group_shape).any(dim=3).any(dim=1)


def _buffers(layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in layer.named_buffers(recurse=False) if b is not None}


def _restore(layer: QuantizedLinear, saved: dict[str, torch.Tensor]) -> None:
    for name, value in saved.items():
        getattr(layer, name).copy_(value)


def trust_mask(scores: torch.Tensor, selected: torch.Tensor, change_sq: torch.Tensor, budget_sq: float) -> torch.Tensor:
    """The highest-scoring selected groups whose summed squared changes stay within ``budget_sq``."""
    order = torch.argsort(torch.where(selected, scores, -torch.inf).flatten(), descending=True)
    order = order[: int(selected.sum())]
    fits = torch.cumsum(change_sq.flatten()[order].double(), 0) <= budget_sq
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order[fits]] = True
    return mask.view_as(scores)


_MAX_PROJECTIONS = 4  # under a joint metric, re-encoding fewer groups can change them differently


def _selection_scores(target: torch.Tensor, before: torch.Tensor, grad: torch.Tensor | None,
                      group_shape: tuple[int, int]) -> torch.Tensor:
    if grad is None:
        return group_sq_norms(target - before, group_shape)
    return group_gains(grad, before - target, group_shape)


@torch.no_grad()
def v_step(layer: QuantizedLinear, target: torch.Tensor, tau: float, trust_ratio: float | None = None,
           current: torch.Tensor | None = None, grad: torch.Tensor | None = None,
           metric: dict[str, torch.Tensor] | None = None) -> VStepStats:
    """Re-encode the fraction ``tau`` of ``layer``'s groups where ``target`` is farthest from Ŵ
    (or, given the loss gradient ``grad``, where moving to it lowers the linearized loss most);
    ``metric`` (``column_weights`` or ``hessian``) is passed to ``project_``: the error the
    re-encoding minimises. Groups are dropped (and the rest re-encoded again) until the kept ones
    satisfy the gain and trust-ratio rules; with independent groups one round suffices, under a
    Hessian at most ``_MAX_PROJECTIONS`` are made."""
    before = layer.dequantize().detach().clone() if current is None else current
    scores = _selection_scores(target, before, grad, layer.group_shape)
    applied = top_fraction_mask(scores, tau)
    if not applied.any():
        return VStepStats(0, 0, scores.numel(), 0.0, before)
    saved = _buffers(layer) if trust_ratio is not None or grad is not None else None

    def project(groups: torch.Tensor) -> None:
        # the other groups' target is their current value: under a joint metric (a Hessian) the
        # re-encoded groups must not try to make up for moves that are not being taken
        layer.project_(torch.where(expand_mask(groups, before.shape), target, before), groups, **(metric or {}))

    project(applied)
    base_norm = before.float().norm().item()
    budget_sq = None if trust_ratio is None else (trust_ratio * base_norm) ** 2
    for _ in range(_MAX_PROJECTIONS):
        after = layer.dequantize().detach()
        change = (after - before).float()
        change_sq = group_sq_norms(change, layer.group_shape)
        kept = applied
        if grad is not None:  # drop the groups whose re-encoding would raise the linearized loss
            scores = group_gains(grad, -change, layer.group_shape)
            kept = kept & ~((change_sq > 0) & (scores <= 0))
        if budget_sq is not None and change_sq[kept].sum().item() > budget_sq:
            kept = trust_mask(scores, kept, change_sq, budget_sq)
        if torch.equal(kept, applied):
            break
        _restore(layer, saved)
        applied = kept
        if kept.any():
            project(kept)
    else:  # the last re-encoding was not checked
        after = layer.dequantize().detach()
        change = (after - before).float()
    changed = int(changed_groups(before, after, layer.group_shape).sum())
    return VStepStats(int(applied.sum()), changed, scores.numel(), change.norm().item() / max(base_norm, 1e-30), after)
