"""AQLM: additive quantization of linear layers (Egiazarian et al., 2024), fast on CPU.

Every group of ``g`` consecutive input weights of row ``o`` is ``s[o] · Σ_m C[m, code]``: one codeword
from each of ``M`` codebooks of ``2**B`` vectors, times a per-output-channel scale. Per layer we
minimise  L = trace((W - Ŵ) H (W - Ŵ)ᵀ)  (H = XᵀX from the calibration pipeline) by

1. initialisation: residual k-means over the scale-normalised weight groups, codebook by codebook,
   weighted by each coordinate's share of the objective (s² · diag H);
2. alternation, until the relative improvement of L falls below ``tolerance`` (at most
   ``max_iterations`` rounds):
   - codes fixed: codebooks by preconditioned conjugate gradient on the (quadratic) objective, then
     the optimal scale of every row in closed form (``codebook_optimizer="cg"``, the default); or
     plain Adam steps on codebooks and scales together (``"adam"``, as the original implementation);
   - codebooks fixed: codes by beam search over the pairwise objective (``aqlm_search``);
3. after all linear layers of a block: Adam on the block's codebooks, scales and norm weights so that
   the block reproduces the full-precision block's outputs (``finetune_block``).

Both halves of the alternation never increase L, so the reconstruction error falls monotonically.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nibble.errors import ConfigError, NonFiniteError
from nibble.formats.aqlm import AQLMLinear, aqlm_storage_bits, index_to_codes, round_to_storage
from nibble.quantize.aqlm_search import _argmin_rows, beam_search
from nibble.quantize.base import LayerQuantizer, QuantConfig, register_method

logger = logging.getLogger(__name__)

#: Largest k-means distance matrix (points × centroids) computed at once.
_KMEANS_CHUNK_ELEMENTS = 1 << 24

PRESETS: dict[str, dict[str, Any]] = {
    # quality within the CPU budget (SmolLM2-135M, 2x8, under an hour on 2 cores)
    "default": dict(beam_size=4, max_iterations=8, tolerance=3e-3, codebook_steps=4, kmeans_iterations=12,
                    kmeans_max_points=32768, finetune_epochs=3, finetune_max_tokens=16384),
    # about 2.5x faster: narrower beam, fewer rounds, smaller k-means, shorter block fine-tuning
    "fast": dict(beam_size=2, max_iterations=4, tolerance=1e-2, codebook_steps=4, kmeans_iterations=8,
                 kmeans_max_points=16384, finetune_epochs=1, finetune_max_tokens=8192),
}


@dataclasses.dataclass(frozen=True)
class AQLMConfig(QuantConfig):
    """Settings of AQLM. Build one with ``AQLMConfig.preset("default" | "fast", **overrides)``.

    ``num_codebooks`` × ``nbits_per_codebook`` / ``group_size`` bits per weight go to the codes;
    codebooks (``num_codebooks`` · 2**B · g float16 values per layer) and scales (one float16 per
    output channel) come on top — see ``bits_per_weight``.
    """

    method: ClassVar[str] = "aqlm"

    num_codebooks: int = 2
    nbits_per_codebook: int = 8
    group_size: int = 8
    beam_size: int = 4
    max_iterations: int = 8
    tolerance: float = 3e-3
    codebook_optimizer: str = "cg"
    codebook_steps: int = 4
    adam_lr: float = 1e-3
    kmeans_iterations: int = 12
    kmeans_max_points: int = 32768
    damping: float = 1e-2
    finetune_epochs: int = 3
    finetune_lr: float = 1e-4
    finetune_max_tokens: int = 16384
    finetune_tolerance: float = 1e-3
    seed: int = 0
    preset_name: str = "default"

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(PRESETS)

    @classmethod
    def preset(cls, name: str = "default", **overrides: Any) -> "AQLMConfig":
        """The named preset with ``overrides`` applied (e.g. ``num_codebooks=1, nbits_per_codebook=12``)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown AQLM preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown AQLM setting(s): {', '.join(unknown)}")
        config = cls(**{**PRESETS[name], "preset_name": name, **overrides})
        config.validate()
        return config

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"aqlm: {message}")

        need(isinstance(self.num_codebooks, int) and 1 <= self.num_codebooks <= 8,
             f"num_codebooks must be 1..8, got {self.num_codebooks}")
        need(isinstance(self.nbits_per_codebook, int) and 8 <= self.nbits_per_codebook <= 16,
             f"nbits_per_codebook must be 8..16, got {self.nbits_per_codebook}")
        need(self.group_size in (4, 8, 16), f"group_size must be 4, 8 or 16, got {self.group_size}")
        need(isinstance(self.beam_size, int) and self.beam_size >= 1, f"beam_size must be >= 1, got {self.beam_size}")
        need(isinstance(self.max_iterations, int) and self.max_iterations >= 0,
             f"max_iterations must be >= 0, got {self.max_iterations}")
        need(self.tolerance >= 0, f"tolerance must be >= 0, got {self.tolerance}")
        need(self.codebook_optimizer in ("cg", "adam"),
             f"codebook_optimizer must be 'cg' or 'adam', got {self.codebook_optimizer!r}")
        need(self.codebook_steps >= 0, f"codebook_steps must be >= 0, got {self.codebook_steps}")
        need(self.adam_lr > 0 and self.finetune_lr > 0, "learning rates must be > 0")
        need(self.kmeans_iterations >= 0, "kmeans_iterations must be >= 0")
        need(self.kmeans_max_points >= 1, "kmeans_max_points must be >= 1")
        need(self.damping >= 0, f"damping must be >= 0, got {self.damping}")
        need(self.finetune_epochs >= 0 and self.finetune_max_tokens >= 1, "finetune settings out of range")
        need(self.finetune_tolerance >= 0, "finetune_tolerance must be >= 0")

    @property
    def code_bits_per_weight(self) -> float:
        return self.num_codebooks * self.nbits_per_codebook / self.group_size

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """All storage bits per weight of an [out, in] layer: codes + float16 codebooks + scales."""
        bits = aqlm_storage_bits(out_features, in_features, self.num_codebooks, self.nbits_per_codebook,
                                 self.group_size)
        return sum(bits.values()) / (out_features * in_features)

    @property
    def name(self) -> str:
        return f"{self.num_codebooks}x{self.nbits_per_codebook}"


# ------------------------------------------------------------------------------------------------
# pieces of the layer fit
# ------------------------------------------------------------------------------------------------

def _decode(index: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Σ_m C[m, index[..., m]] as [out, in] (no scales)."""
    out_features, num_groups, num_codebooks = index.shape
    total = codebooks[0][index[..., 0]]
    for m in range(1, num_codebooks):
        total = total + codebooks[m][index[..., m]]
    return total.reshape(out_features, num_groups * codebooks.shape[-1])


def _scatter(index: torch.Tensor, values: torch.Tensor, num_entries: int) -> torch.Tensor:
    """Adjoint of ``_decode``: sum the [out, in] ``values`` of every group into its codewords."""
    num_codebooks = index.shape[-1]
    group_size = values.shape[-1] // index.shape[1]
    flat = values.reshape(-1, group_size)
    out = values.new_zeros(num_codebooks, num_entries, group_size)
    for m in range(num_codebooks):
        out[m].index_add_(0, index[..., m].reshape(-1), flat)
    return out


def _kmeans(points: torch.Tensor, weights: torch.Tensor, num_clusters: int, iterations: int,
            max_points: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means: min Σ_i Σ_a w_ia (x_ia - c_a)². Returns (centroids [K, g], labels [N])."""
    num_points, dim = points.shape
    device = points.device
    if num_points > max_points:
        pick = torch.randperm(num_points, generator=generator)[:max_points].to(device)
        sample, sample_w = points[pick], weights[pick]
    else:
        sample, sample_w = points, weights
    n = sample.shape[0]
    order = torch.randperm(n, generator=generator).to(device)
    if n >= num_clusters:
        centroids = sample[order[:num_clusters]].clone()
    else:
        extra = torch.randint(0, n, (num_clusters - n,), generator=generator).to(device)
        centroids = torch.cat([sample[order], sample[extra]])

    def assign(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        rhs = torch.cat([-2 * c.t(), (c * c).t()], dim=0)                    # [2g, K]
        chunk = max(1, _KMEANS_CHUNK_ELEMENTS // c.shape[0])
        return torch.cat([_argmin_rows(torch.cat([w[i:i + chunk] * x[i:i + chunk], w[i:i + chunk]], 1) @ rhs)[:, 0]
                          for i in range(0, x.shape[0], chunk)])

    for _ in range(iterations):
        labels = assign(sample, sample_w, centroids)
        num = torch.zeros_like(centroids).index_add_(0, labels, sample_w * sample)
        den = torch.zeros_like(centroids).index_add_(0, labels, sample_w)
        empty = den.sum(1) <= 0
        centroids = torch.where(den > 0, num / den.clamp_min(1e-30), centroids)
        if empty.any():
            reseed = torch.randint(0, n, (int(empty.sum()),), generator=generator).to(device)
            centroids[empty] = sample[reseed]
    return centroids, assign(points, weights, centroids)


def _block_preconditioner(index: torch.Tensor, scales: torch.Tensor, hessian: torch.Tensor,
                          num_entries: int) -> torch.Tensor:
    """Inverses of the g×g diagonal blocks of the codebook system: Σ_{o,j→k} s_o² H_jj (+ridge)."""
    out_features, num_groups, num_codebooks = index.shape
    group_size = hessian.shape[0] // num_groups
    blocks = hessian.reshape(num_groups, group_size, num_groups, group_size).diagonal(dim1=0, dim2=2)
    blocks = blocks.permute(2, 0, 1)                                             # [G, g, g]
    weight = (scales * scales)[:, None].expand(out_features, num_groups).reshape(-1)
    group_of = torch.arange(num_groups, device=index.device).repeat(out_features)
    eye = torch.eye(group_size, device=hessian.device, dtype=hessian.dtype)
    ridge = 1e-6 * float(hessian.diagonal().mean()) * float(weight.mean().clamp_min(1e-30))
    result = []
    for m in range(num_codebooks):
        flat = group_of * num_entries + index[..., m].reshape(-1)
        counts = torch.zeros(num_groups * num_entries, dtype=hessian.dtype, device=hessian.device)
        counts.index_add_(0, flat, weight)
        block = torch.einsum("jk,jab->kab", counts.reshape(num_groups, num_entries), blocks)
        result.append(torch.linalg.inv(block + ridge * eye))
    return torch.stack(result)                                                   # [M, K, g, g]


def _codebooks_cg(weight_h: torch.Tensor, hessian: torch.Tensor, index: torch.Tensor,
                  codebooks: torch.Tensor, scales: torch.Tensor, residual_h: torch.Tensor,
                  steps: int) -> torch.Tensor:
    """A few preconditioned CG steps on the codebooks (codes and scales fixed); never raises L."""
    num_entries = codebooks.shape[1]
    precond = _block_preconditioner(index, scales, hessian, num_entries)
    s = scales[:, None]
    codebooks = codebooks.clone()
    residual = _scatter(index, s * residual_h, num_entries)                      # -½ gradient
    z = (precond @ residual[..., None]).squeeze(-1)
    direction = z
    rz = float((residual * z).sum())
    for _ in range(steps):
        if rz <= 0:
            break
        product = _scatter(index, (s * s) * (_decode(index, direction) @ hessian), num_entries)
        curvature = float((direction * product).sum())
        if not curvature > 0:
            break
        alpha = rz / curvature
        codebooks += alpha * direction
        residual -= alpha * product
        z = (precond @ residual[..., None]).squeeze(-1)
        rz_new = float((residual * z).sum())
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return codebooks


def _optimal_scales(weight: torch.Tensor, decoded: torch.Tensor, decoded_h: torch.Tensor,
                    old: torch.Tensor) -> torch.Tensor:
    """Per-row least-squares scale: argmin_s (w - s d)ᵀ H (w - s d)."""
    num = (weight * decoded_h).sum(1)
    den = (decoded * decoded_h).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), old)


def _adam_codebooks_scales(weight: torch.Tensor, hessian: torch.Tensor, index: torch.Tensor,
                           codebooks: torch.Tensor, scales: torch.Tensor, steps: int, lr: float,
                           norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    books = codebooks.clone().requires_grad_(True)
    sc = scales.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([books, sc], lr=lr, betas=(0.9, 0.95))
    with torch.enable_grad():
        for _ in range(steps):
            residual = weight - sc[:, None] * _decode(index, books)
            loss = ((residual @ hessian) * residual).sum() / norm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return books.detach(), sc.detach()


@dataclasses.dataclass
class FitResult:
    """Outcome of ``fit_aqlm``: code indices, codebooks, scales and the loss history."""

    index: torch.Tensor          # [out, in/g, M] int64
    codebooks: torch.Tensor      # [M, 2**B, g] float32 (float16-representable)
    scales: torch.Tensor         # [out] float32 (float16-representable)
    losses: list[float]          # relative error L / trace(W H Wᵀ): after init, then every round
    final_loss: float            # relative error after rounding codebooks and scales to float16
    seconds: float


def relative_error(weight: torch.Tensor, hessian: torch.Tensor, approx: torch.Tensor) -> float:
    """trace((W-Ŵ) H (W-Ŵ)ᵀ) / trace(W H Wᵀ)."""
    residual = (weight - approx).float()
    hessian = hessian.to(residual.device, torch.float32)
    weight = weight.float()
    return float(((residual @ hessian) * residual).sum() / ((weight @ hessian) * weight).sum().clamp_min(1e-30))


def prepare_hessian(hessian: torch.Tensor, damping: float, device: torch.device) -> torch.Tensor:
    """H scaled to mean diagonal 1 (float32), plus ``damping`` · I; raises on NaN/Inf."""
    h = hessian.to(device=device, dtype=torch.float64)
    if not torch.isfinite(h).all():
        raise NonFiniteError("aqlm: the input Hessian holds NaN or Inf")
    h = (h + h.t()) / 2
    mean_diag = float(h.diagonal().mean())
    if mean_diag <= 0:
        h = torch.eye(h.shape[0], dtype=h.dtype, device=device)
        mean_diag = 1.0
    h = h / mean_diag
    h.diagonal().add_(damping)
    return h.to(torch.float32)


def fit_aqlm(weight: torch.Tensor, hessian: torch.Tensor, config: AQLMConfig,
             generator: torch.Generator | None = None,
             progress: Callable[[int, float], None] | None = None) -> FitResult:
    """Fit codes, codebooks and scales to ``weight`` [out, in] under ``hessian`` [in, in] (prepared or raw)."""
    started = time.perf_counter()
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    weight = weight.detach().to(torch.float32)
    out_features, in_features = weight.shape
    g = config.group_size
    if in_features % g:
        raise ConfigError(f"aqlm: in_features={in_features} is not a multiple of group_size={g}")
    num_groups = in_features // g
    num_entries = 2**config.nbits_per_codebook
    hessian = prepare_hessian(hessian, config.damping, weight.device)
    weight_h = weight @ hessian
    norm = float((weight * weight_h).sum().clamp_min(1e-30))

    # --- initialisation: residual, weighted k-means on scale-normalised groups -----------------
    scales = weight.pow(2).mean(1).sqrt().clamp_min(1e-8)
    points = (weight / scales[:, None]).reshape(-1, g)
    point_w = ((scales * scales)[:, None] * hessian.diagonal()[None, :]).reshape(-1, g).clamp_min(1e-12)
    residual = points.clone()
    books, labels = [], []
    for _ in range(config.num_codebooks):
        centroids, assigned = _kmeans(residual, point_w, num_entries, config.kmeans_iterations,
                                      config.kmeans_max_points, generator)
        residual -= centroids[assigned]
        books.append(centroids)
        labels.append(assigned)
    codebooks = torch.stack(books)
    index = torch.stack(labels, dim=-1).reshape(out_features, num_groups, config.num_codebooks)

    decoded = _decode(index, codebooks)
    decoded_h = decoded @ hessian
    residual_h = weight_h - scales[:, None] * decoded_h
    loss = float(((weight - scales[:, None] * decoded) * residual_h).sum()) / norm
    losses = [loss]
    if progress:
        progress(0, loss)

    for iteration in range(1, config.max_iterations + 1):
        # codes fixed: codebooks and scales
        if config.codebook_optimizer == "cg":
            codebooks = _codebooks_cg(weight_h, hessian, index, codebooks, scales, residual_h, config.codebook_steps)
            decoded = _decode(index, codebooks)
            decoded_h = decoded @ hessian
            scales = _optimal_scales(weight, decoded, decoded_h, scales)
        else:
            codebooks, scales = _adam_codebooks_scales(weight, hessian, index, codebooks, scales,
                                                       config.codebook_steps, config.adam_lr, norm)
            decoded = _decode(index, codebooks)
            decoded_h = decoded @ hessian
        residual_h = weight_h - scales[:, None] * decoded_h
        # codebooks fixed: codes
        index, residual_h = beam_search(weight, index, codebooks, scales, hessian=hessian,
                                        beam_size=config.beam_size, residual_hessian=residual_h,
                                        return_residual_hessian=True)
        decoded = _decode(index, codebooks)
        loss = float(((weight - scales[:, None] * decoded) * residual_h).sum()) / norm
        losses.append(loss)
        if progress:
            progress(iteration, loss)
        previous = losses[-2]
        if previous <= 0 or (previous - loss) / previous < config.tolerance:
            break

    codebooks = round_to_storage(codebooks)
    scales = round_to_storage(scales)
    residual = weight - scales[:, None] * _decode(index, codebooks)
    final = float(((residual @ hessian) * residual).sum()) / norm
    return FitResult(index, codebooks, scales, losses, final, time.perf_counter() - started)


def _layer_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


# ------------------------------------------------------------------------------------------------
# the quantizer the calibration pipeline drives
# ------------------------------------------------------------------------------------------------

def _norm_parameters(block: nn.Module) -> list[nn.Parameter]:
    params = []
    for module in block.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.lower().endswith("norm"):
            params.extend(p for p in module.parameters(recurse=False) if p.is_floating_point())
    return params


@register_method(AQLMConfig)
class AQLMQuantizer(LayerQuantizer):
    """Quantizes linear layers to ``AQLMLinear`` and fine-tunes each finished block."""

    needs_block_targets: ClassVar[bool] = True
    config: AQLMConfig

    def __init__(self, config: AQLMConfig,
                 progress: Callable[[str, dict[str, float]], None] | None = None):
        super().__init__(config)
        #: called as progress(layer_name, {"iteration": i, "rel_error": e}) during each layer's fit
        self.progress = progress
        #: per-layer results: name -> {"rel_error", "rel_error_init", "iterations", "seconds", "bpw"}
        self.layer_stats: dict[str, dict[str, float]] = {}
        self._warned_shapes: set[tuple[int, int]] = set()

    def quantize_layer(self, name: str, linear: nn.Linear, hessian: torch.Tensor) -> AQLMLinear:
        config = self.config
        out_features, in_features = linear.weight.shape
        bits = aqlm_storage_bits(out_features, in_features, config.num_codebooks, config.nbits_per_codebook,
                                 config.group_size)
        if bits["codebooks"] > bits["codes"] and (out_features, in_features) not in self._warned_shapes:
            self._warned_shapes.add((out_features, in_features))
            logger.warning(
                "%s: the %s codebooks cost more bits than the codes (%d vs %d; %.2f bits/weight in all) — "
                "use smaller codebooks (e.g. 2x8, 3x8, 4x8) for layers this small",
                name, config.name, bits["codebooks"], bits["codes"], sum(bits.values()) / linear.weight.numel())

        def report(iteration: int, loss: float) -> None:
            logger.debug("%s: round %d rel.err %.5f", name, iteration, loss)
            if self.progress:
                self.progress(name, {"iteration": iteration, "rel_error": loss})

        with torch.no_grad():
            result = fit_aqlm(linear.weight, hessian, config, _layer_generator(config.seed, name), report)
        module = AQLMLinear(
            in_features, out_features, config.num_codebooks, config.nbits_per_codebook, config.group_size,
            bias=linear.bias,
            codes=index_to_codes(result.index, config.nbits_per_codebook),
            codebooks=result.codebooks,
            scales=result.scales,
        ).to(linear.weight.device)
        stats = {
            "rel_error_init": result.losses[0],
            "rel_error": result.final_loss,
            "iterations": len(result.losses) - 1,
            "seconds": result.seconds,
            "bpw": module.bits_per_weight(),
        }
        self.layer_stats[name] = stats
        logger.info("%s: aqlm %s rel.err %.4f (init %.4f, %d rounds, %.1fs, %.3f bpw)", name, config.name,
                    stats["rel_error"], stats["rel_error_init"], stats["iterations"], stats["seconds"], stats["bpw"])
        return module

    def finetune_block(self, block: nn.Module, data) -> dict[str, float]:
        """Adam on the block's codebooks, scales and norm weights (codes fixed) to match the targets."""
        config = self.config
        layers = [m for m in block.modules() if isinstance(m, AQLMLinear)]
        if not layers or config.finetune_epochs == 0 or not data.targets or not data.inputs:
            return {}
        started = time.perf_counter()
        trained = [p for layer in layers for p in (layer.codebooks, layer.scales)] + _norm_parameters(block)
        saved_flags = {id(p): p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)

        count = len(data.inputs)
        validation = [count - 1] if count >= 2 else [0]
        pool = list(range(count - 1)) if count >= 2 else [0]
        tokens_per_batch = max(1, data.inputs[0].numel() // data.inputs[0].shape[-1])
        per_epoch = max(1, min(len(pool), math.ceil(config.finetune_max_tokens / tokens_per_batch)))
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.Adam(trained, lr=config.finetune_lr, betas=(0.9, 0.95))

        def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = data.inputs[i].to(data.device).clone()
            y = data.targets[i].to(data.device).clone()
            return x, y

        def loss_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            out = out[0] if isinstance(out, tuple) else out
            return F.mse_loss(out.float(), target.float()) / target.float().pow(2).mean().clamp_min(1e-30)

        def evaluate() -> float:
            with torch.no_grad():
                return sum(float(loss_of(data.run(block, x), y)) for x, y in map(batch, validation)) / len(validation)

        best = evaluate()
        before = best
        best_state = [p.detach().clone() for p in trained]
        epochs_run = 0
        try:
            with torch.inference_mode(False), torch.enable_grad():
                for _ in range(config.finetune_epochs):
                    order = torch.randperm(len(pool), generator=generator)[:per_epoch].tolist()
                    for i in order:
                        x, y = batch(pool[i])
                        loss = loss_of(data.run(block, x), y)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                    epochs_run += 1
                    current = evaluate()
                    logger.debug("block fine-tuning epoch %d: held-out rel.mse %.6f", epochs_run, current)
                    if not math.isfinite(current):
                        break
                    improved = current < best
                    gain = (best - current) / best if best > 0 else 0.0
                    if improved:
                        best = current
                        best_state = [p.detach().clone() for p in trained]
                    if gain < config.finetune_tolerance:
                        break
        finally:
            with torch.no_grad():
                for p, value in zip(trained, best_state):
                    p.copy_(value)
            for p in block.parameters():
                p.requires_grad_(saved_flags[id(p)])
            for layer in layers:
                layer.round_to_storage_()
        after = evaluate()
        metrics = {"finetune_loss_before": before, "finetune_loss_after": after, "finetune_epochs": epochs_run,
                   "finetune_seconds": time.perf_counter() - started}
        logger.info("block fine-tuning: rel.mse %.5f -> %.5f (%d epochs, %.1fs)", before, after, epochs_run,
                    metrics["finetune_seconds"])
        return metrics
