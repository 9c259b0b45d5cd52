"""The error a V step's re-encoding minimises, from statistics of the layers' training inputs.

``plain``: squared error, no statistics. ``inputs``: squared error weighted per input column by
the inputs' mean square (the diagonal of XᵀX/n), over every training forward. ``hessian``:
trace(ΔW H ΔWᵀ) with H = XᵀX/n of the first step's inputs, damped as in AQLM calibration (the
metric AQLM's codes were fitted in). Statistics are per process: a layer's V step runs on the
process that owns it, with what that process saw.
"""

from __future__ import annotations

import torch

from nibble.errors import ConfigError
from nibble.formats.base import QuantizedLinear
from nibble.quantize.aqlm import AQLMConfig, prepare_hessian

HESSIAN_DAMPING = AQLMConfig.damping  # relative to the mean diagonal, as in AQLM calibration


class InputStatistics:
    """Per-layer sums over the training inputs that define the ``metric`` (see the module doc)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._hessians: dict[str, torch.Tensor] = {}

    def wanted(self, step: int) -> bool:
        """Whether the training forwards of ``step`` should be recorded."""
        return self.metric == "inputs" or (self.metric == "hessian" and step == 0)

    @torch.no_grad()
    def record(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        stat = flat.pow(2).sum(0) if self.metric == "inputs" else flat.T @ flat
        self.sums[name] = stat if name not in self.sums else self.sums[name].add_(stat)
        self.rows[name] = self.rows.get(name, 0) + flat.shape[0]

    def column_weights(self, name: str) -> torch.Tensor | None:
        """Mean square of layer ``name``'s training inputs per column (None: other metric or no data)."""
        if self.metric != "inputs" or name not in self.sums:
            return None
        mean_sq = self.sums[name] / self.rows[name]
        return mean_sq.clamp_min(1e-8 * float(mean_sq.max()))

    def project_kwargs(self, name: str) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``project_`` for layer ``name`` ({} for plain squared error)."""
        if name not in self.sums:
            return {}
        if self.metric == "inputs":
            return {"column_weights": self.column_weights(name)}
        if name not in self._hessians:
            self._hessians[name] = prepare_hessian(self.sums[name] / self.rows[name], HESSIAN_DAMPING,
                                                   self.sums[name].device)
        return {"hessian": self._hessians[name]}

    def state_tensors(self, names: set[str]) -> dict[str, torch.Tensor]:
        state = {f"inputs::{n}": t for n, t in self.sums.items() if n in names}
        state.update({f"input_rows::{n}": torch.tensor([r], dtype=torch.float64)
                      for n, r in self.rows.items() if n in names})
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], names: set[str]) -> None:
        for name in names:
            if f"inputs::{name}" in tensors:
                self.sums[name] = tensors[f"inputs::{name}"].float().clone()
                self.rows[name] = int(tensors[f"input_rows::{name}"].item())


def check_metric_supported(metric: str, layers: dict[str, QuantizedLinear]) -> None:
    """Refuse ``hessian`` when a layer's format cannot re-encode under a Hessian (scalar formats)."""
    if metric != "hessian":
        return
    for name, layer in layers.items():
        if not layer.projects_under_hessian:
            raise ConfigError(f"--v-metric hessian needs a format whose re-encoding takes a Hessian "
                              f"(AQLM); layer {name} is {layer.format_name}")
