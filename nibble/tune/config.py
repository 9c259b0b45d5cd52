"""Settings of a PV-Tuning run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from nibble.errors import ConfigError

MODES = ("pv", "ste")
V_SELECTIONS = ("change", "gain")
V_METRICS = ("plain", "inputs", "hessian")
SCHEDULES = ("constant", "cosine")


@dataclass
class TuneConfig:
    """How the student is tuned. Learning rates are per step of one global batch.

    ``mode``: ``pv`` = linearized subspace V step (re-encode the fraction ``tau`` of groups whose
    proposed change Ŵ → Ŵ − step is largest); ``ste`` = straight-through estimation (a dense
    shadow weight takes the optimizer steps; the fraction ``tau`` of groups farthest from it are
    re-encoded onto it, every group when tau = 1).
    ``v_lr`` is in units of each layer's weight RMS (the V step's move, before projection, is
    ``v_lr · rms(Ŵ) · m̂/(√v̂ + ε)``, from an Adam on the dense weights).
    ``schedule``: ``cosine`` decays both learning rates from their value at step 0 to
    ``min_lr_ratio`` times it at the last step; ``constant`` keeps them.
    V steps start at step ``v_start`` (the V-step Adam moments are accumulated from step 0, so
    that the first V step already ranks groups by consistent gradients). The default 1 skips
    step 0, whose Adam direction is sign(∇L): every group would propose a move of the same size,
    and the ``change`` ranking would pick groups by position.
    ``v_memory`` (``pv`` only): the fraction of what a V step's target asked for but re-encoding
    did not deliver (Y − Ŵ_new) that is added to the next V step's target; 0 forgets it, so a move
    smaller than the distance to the next representable value never changes a code; values near 1
    let consistent moves add up until they do (with 1, much like the STE shadow weight).
    ``v_select`` (``pv`` only): ``change`` ranks groups by the size of the proposed move;
    ``gain`` ranks them by the linearized loss decrease ⟨∇L, move⟩ and keeps only re-encodings
    that lower the linearized loss. (Adam's first direction is sign(∇L), so at the first V step
    every group proposes a move of the same size and ``change`` ranks them by position alone.)
    ``v_metric``: the error a V step's re-encoding minimises, ``plain`` squared error or ``inputs``:
    weighted per input column by the mean square of the layer's training inputs (the diagonal of
    XᵀX), so that codes move least where the inputs are large (matters for AQLM only: a scalar
    weight rounds on its own); ``hessian``: in trace(ΔW H ΔWᵀ) with H = XᵀX of the first step's
    inputs (damped as in AQLM calibration), the metric AQLM's codes were fitted in (AQLM only).
    """

    mode: str = "pv"
    steps: int = 100
    batch_size: int = 8
    microbatch_size: int = 1
    lr: float = 1e-3
    v_lr: float = 0.05
    tau: float | None = None
    trust_ratio: float | None = 0.01
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    v_every: int = 1
    v_start: int = 1
    v_memory: float = 0.0
    v_select: str = "change"
    v_metric: str = "plain"
    v_betas: tuple[float, float] = (0.9, 0.95)
    train_norms: bool = True
    train_non_quantized: bool = False
    lamb: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    checkpointing: bool = True
    kl_rows: int = 512
    kl_cols: int = 16384
    seed: int = 0

    @property
    def effective_tau(self) -> float:
        if self.tau is not None:
            return self.tau
        return 1.0 if self.mode == "ste" else 0.01

    def validate(self) -> "TuneConfig":
        if self.mode not in MODES:
            raise ConfigError(f"unknown tuning mode {self.mode!r}: use {' or '.join(MODES)}")
        if not 0.0 <= self.effective_tau <= 1.0:
            raise ConfigError(f"--tau must lie in [0, 1], got {self.tau}")
        if self.steps < 0 or self.batch_size < 1 or self.microbatch_size < 1 or self.v_every < 1 or self.v_start < 0:
            raise ConfigError("--steps must be >= 0 and --batch-size, --microbatch-size, --v-every >= 1")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: use {' or '.join(SCHEDULES)}")
        if self.v_select not in V_SELECTIONS:
            raise ConfigError(f"unknown V-step selection {self.v_select!r}: use {' or '.join(V_SELECTIONS)}")
        if self.v_metric not in V_METRICS:
            raise ConfigError(f"unknown V-step metric {self.v_metric!r}: use {' or '.join(V_METRICS)}")
        if self.v_select == "gain" and self.mode == "ste":
            raise ConfigError("--v-select gain is for --mode pv (STE re-encodes onto its shadow weights)")
        if not 0.0 <= self.v_memory <= 1.0:
            raise ConfigError(f"--v-memory must lie in [0, 1], got {self.v_memory}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.lr < 0 or self.v_lr < 0 or (self.trust_ratio is not None and self.trust_ratio <= 0):
            raise ConfigError("learning rates must be >= 0 and --trust-ratio > 0")
        return self

    def lr_factor(self, step: int) -> float:
        """The multiplier of both learning rates at ``step`` (0-based) under the schedule."""
        if self.schedule == "constant" or self.steps <= 1:
            return 1.0
        progress = min(step, self.steps - 1) / (self.steps - 1)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"], data["v_betas"] = list(self.betas), list(self.v_betas)
        data["tau"] = self.effective_tau
        return data
