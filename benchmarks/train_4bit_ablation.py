"""Which GEMM operand costs the byte-level LM its perplexity under 4-bit training (issue 5).

Each variant quantizes a subset of the operands of the ``ibm-fp4`` family (INT4 SAWB weights, INT4
activations, radix-4/radix-2 FP4 gradients, nearest or stochastic rounding); one seed, one epoch,
one thread, WikiText-2 perplexity per byte of the first 262,144 bytes, as ``train_4bit.py``.

    NIBBLE_DATA=../shared/data python benchmarks/train_4bit_ablation.py [--variants ...] [--seed 0]

``--fidelity-every N`` instead prints, every N steps of each variant's training, the cosine of every
quantized layer's weight gradient to the exact gradient of the same INT4 forward pass
(``--fidelity-window W``: over W consecutive steps, per step and of their sum).
``--expected-gradient STEP DRAWS`` compares, per parameter group, the mean of DRAWS gradients at STEP
with the exact one (the bias, without the noise). ``--signed-clip`` swaps how the INT4 forward clips
signed activations (``SIGNED_CLIPS``).
"""

from __future__ import annotations

import argparse
import sys
import time

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from nibble.train import layers
from nibble.train.layers import QLinear
from nibble.train.quantizers import init_pact_alpha, pact_clip, sawb_clip
from nibble.train.recipes import RECIPES, Recipe
from nibble.train.tasks.lm import LMConfig, run_lm

_FORWARD = dict(weight="int4-sawb", act="int4-pact")
VARIANTS: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fp32", "no quantization", keep=()),
    Recipe("weights-only", "INT4 SAWB weights", weight="int4-sawb"),
    Recipe("activations-only", "INT4 activations", act="int4-pact"),
    Recipe("int4-forward", "INT4 weights and activations", **_FORWARD),
    Recipe("dgrad-log4", "INT4 forward + radix-4 FP4 on the input-gradient GEMM's dY", **_FORWARD,
           dgrad_grad="log4-even"),
    Recipe("wgrad-log4", "INT4 forward + radix-4 FP4 on the weight-gradient GEMM's dY", **_FORWARD,
           wgrad_grad="log4-odd"),
    Recipe("ibm-fp4", "both, nearest rounding", **_FORWARD, dgrad_grad="log4-even", wgrad_grad="log4-odd"),
    Recipe("ibm-fp4-sr", "both, stochastic rounding", **_FORWARD, dgrad_grad="log4-even-sr",
           wgrad_grad="log4-odd-sr"),
    Recipe("ibm-fp4-vec", "both, nearest, one GradScale per GEMM output vector", **_FORWARD,
           dgrad_grad="log4-even-vec", wgrad_grad="log4-odd-vec"),
    Recipe("ibm-fp4-sr-vec", "both, stochastic, one GradScale per GEMM output vector", **_FORWARD,
           dgrad_grad="log4-even-sr-vec", wgrad_grad="log4-odd-sr-vec"),
    Recipe("ibm-fp4-geo", "both, nearest in the log domain (geometric midpoints)", **_FORWARD,
           dgrad_grad="log4-even-geo", wgrad_grad="log4-odd-geo"),
    Recipe("ibm-fp4-alt", "both, nearest, the phase alternating along each GEMM's reduction", **_FORWARD,
           dgrad_grad="log4-even-alt", wgrad_grad="log4-odd-alt"),
    Recipe("wgrad-alt", "both, nearest; only the weight-gradient GEMM's phase alternates", **_FORWARD,
           dgrad_grad="log4-even", wgrad_grad="log4-odd-alt"),
    Recipe("ibm-fp4-b32", "both, nearest, one GradScale per 32 values along each GEMM's reduction", **_FORWARD,
           dgrad_grad="log4-even-b32", wgrad_grad="log4-odd-b32"),
    Recipe("ibm-fp4-sr-b32", "both, stochastic, one GradScale per 32 values along each GEMM's reduction",
           **_FORWARD, dgrad_grad="log4-even-sr-b32", wgrad_grad="log4-odd-sr-b32"),
    Recipe("ibm-fp4-dither-tensor", "both, nearest, one GradScale per tensor shifted by a random 2^u, u in [0, 2)",
           **_FORWARD, dgrad_grad="log4-even-dither", wgrad_grad="log4-odd-dither"),
    Recipe("ibm-fp4-dither-biased", "both, nearest, a dithered GradScale per 32 values along each GEMM's "
           "reduction, not divided by its mean gain (ibm-fp4-dither of session 9)", **_FORWARD,
           dgrad_grad="log4-even-dither-b32", wgrad_grad="log4-odd-dither-b32"),
    RECIPES["ibm-fp4-dither"],  # the same, divided by the dither's mean gain 1.2/ln 4: unbiased
    Recipe("dgrad-dither-biased", "INT4 forward + ibm-fp4-dither-biased's FP4 dY in the input-gradient GEMM only",
           **_FORWARD, dgrad_grad="log4-even-dither-b32"),
    Recipe("dgrad-dither", "INT4 forward + ibm-fp4-dither's FP4 dY in the input-gradient GEMM only", **_FORWARD,
           dgrad_grad="log4-even-udither-b32"),
    Recipe("wgrad-dither-biased", "INT4 forward + ibm-fp4-dither-biased's FP4 dY in the weight-gradient GEMM only",
           **_FORWARD, wgrad_grad="log4-odd-dither-b32"),
    Recipe("radix2", "radix-2 FP4 on both, nearest", **_FORWARD, dgrad_grad="log2", wgrad_grad="log2"),
    Recipe("radix2-geo", "radix-2 FP4 on both, nearest in the log domain", **_FORWARD, dgrad_grad="log2-geo",
           wgrad_grad="log2-geo"),
    Recipe("radix2-sr", "radix-2 FP4 on both, stochastic", **_FORWARD, dgrad_grad="log2-sr", wgrad_grad="log2-sr"),
)}


def _masked_signed_clip(clip):
    """A ``_clip_and_plan`` that clips signed inputs at ``clip(x)`` with PACT's gradient mask
    (clipped elements get no gradient) instead of the library's straight-through gradient."""
    def clip_and_plan(self, x: torch.Tensor):
        if self.recipe.uses_pact:
            if not self.alpha_ready:
                self._init_alpha(x)
            if self.pact_signed:
                alpha = clip(x)
                return pact_clip(x, alpha, True), self.recipe.plan(alpha, True)
        return _LIBRARY_CLIP(self, x)
    return clip_and_plan


_LIBRARY_CLIP = layers._QuantizedMixin._clip_and_plan
SIGNED_CLIPS = {  # how the INT4 forward clips signed activations (LayerNorm and attention outputs)
    "sawb": _LIBRARY_CLIP,  # the library's: SAWB clip per batch, gradients straight through
    "sawb-masked": _masked_signed_clip(lambda x: sawb_clip(x, 4)),  # before session 10
    "mse-masked": _masked_signed_clip(  # least-squared-error clip per batch
        lambda x: torch.tensor(init_pact_alpha(x, 4, signed=True, candidates=32, sample=2 ** 14))),
    "max-masked": _masked_signed_clip(lambda x: x.detach().abs().max()),  # no clipping
}


@contextmanager
def signed_clip(name: str):
    """Temporarily clip the quantized layers' signed inputs as ``SIGNED_CLIPS[name]`` says."""
    layers._QuantizedMixin._clip_and_plan = SIGNED_CLIPS[name]
    try:
        yield
    finally:
        layers._QuantizedMixin._clip_and_plan = _LIBRARY_CLIP


@contextmanager
def recipe_of(model: nn.Module, recipe: Recipe):
    """Temporarily run every quantized layer of ``model`` under ``recipe`` (same PACT clips)."""
    quantized = [m for m in model.modules() if isinstance(m, QLinear)]
    saved = [m.recipe for m in quantized]
    for m in quantized:
        m.recipe = recipe
    try:
        yield
    finally:
        for m, r in zip(quantized, saved):
            m.recipe = r


def parameter_grads(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of every parameter on one batch, by parameter name (the model's grads are left cleared)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def weight_grads(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the quantized layers' weights on one batch, by layer name."""
    grads = parameter_grads(model, inputs, targets)
    return {name: grads[f"{name}.weight"] for name, m in model.named_modules() if isinstance(m, QLinear)}


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names by kind: quantized weights, their biases, LayerNorms, embeddings, the fp32 head."""
    plain = {nn.Embedding: "embeddings", nn.LayerNorm: "LayerNorms", nn.Linear: "fp32 head"}
    quantized = {"weight": "quantized weights", "bias": "quantized layers' biases"}
    groups: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            kind = quantized.get(name) if isinstance(module, QLinear) else plain.get(type(module))
            if kind:
                groups.setdefault(kind, []).append(f"{module_name}.{name}")
    return groups


class ExpectedGradient:
    """At step ``at`` of a variant's training, the mean of ``draws`` gradients on that step's batch
    (random rounding drawn afresh each time) against the exact gradient of the same INT4 forward,
    per parameter group: cosine and norm ratio. Averaging removes the rounding noise and leaves the
    bias, including a scale that per-layer cosines cannot see. The RNG state is restored."""

    def __init__(self, at: int, draws: int, reference: Recipe = VARIANTS["int4-forward"]):
        self.at, self.draws, self.reference = at, draws, reference
        self.rows: dict[str, tuple[float, float]] = {}

    def __call__(self, model: nn.Module, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if step != self.at:
            return
        rng = torch.get_rng_state()
        with recipe_of(model, self.reference):
            exact = parameter_grads(model, inputs, targets)
        mean = {name: torch.zeros_like(g) for name, g in exact.items()}
        for _ in range(self.draws):
            for name, g in parameter_grads(model, inputs, targets).items():
                mean[name] += g / self.draws
        torch.set_rng_state(rng)
        for kind, names in parameter_groups(model).items():
            e = torch.cat([exact[n].flatten() for n in names])
            m = torch.cat([mean[n].flatten() for n in names])
            self.rows[kind] = (_cosine(m, e), float(m.norm() / e.norm()))

    def table(self) -> str:
        lines = ["| parameters | cosine | norm ratio |", "|---|---|---|"]
        lines += [f"| {kind} | {cosine:.3f} | {ratio:.3f} |" for kind, (cosine, ratio) in self.rows.items()]
        return "\n".join(lines)


class Fidelity:
    """Cosine of each quantized layer's weight gradient to the exact gradient of the same (INT4)
    forward pass, at the variant's own weights during its training: over ``window`` consecutive
    steps from every ``every``-th, both per step (averaged) and of the gradients summed over the
    window (what momentum sees: zero-mean rounding noise cancels in the sum, a bias does not).
    The RNG state is restored, so training is the same as without it."""

    def __init__(self, every: int, window: int = 1, reference: Recipe = VARIANTS["int4-forward"]):
        self.every, self.window, self.reference = every, window, reference
        self.rows: list[tuple[int, dict[str, float], dict[str, float]]] = []
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._step_cosines: list[dict[str, float]] = []

    def __call__(self, model: nn.Module, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        offset = step % self.every
        if offset >= self.window:
            return
        rng = torch.get_rng_state()
        with recipe_of(model, self.reference):
            exact = weight_grads(model, inputs, targets)
        quantized = weight_grads(model, inputs, targets)
        torch.set_rng_state(rng)
        if offset == 0:
            self._sums = {name: [torch.zeros_like(g), torch.zeros_like(g)] for name, g in exact.items()}
            self._step_cosines = []
        self._step_cosines.append({name: _cosine(quantized[name], g) for name, g in exact.items()})
        for name, g in exact.items():
            self._sums[name][0] += g
            self._sums[name][1] += quantized[name]
        if offset == self.window - 1:
            names = list(exact)
            one_step = {n: sum(c[n] for c in self._step_cosines) / self.window for n in names}
            summed = {n: _cosine(q, e) for n, (e, q) in self._sums.items()}
            self.rows.append((step - offset, one_step, summed))

    def table(self) -> str:
        if not self.rows:
            return "(no complete window: training ended before one)"
        names = list(self.rows[0][1])
        lines = [f"| steps | {' | '.join(n.replace('blocks.', 'b') for n in names)} | mean |",
                 "|---" * (len(names) + 2) + "|"]
        for start, one_step, summed in self.rows:
            cells = [f"{one_step[n]:.2f}" + (f" / {summed[n]:.2f}" if self.window > 1 else "") for n in names]
            mean = f"{sum(one_step.values()) / len(names):.2f}"
            if self.window > 1:
                mean += f" / {sum(summed.values()) / len(names):.2f}"
            lines.append(f"| {start}-{start + self.window - 1} | {' | '.join(cells)} | {mean} |")
        return "\n".join(lines)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fidelity-every", type=int, default=0, metavar="N",
                        help="every N steps, print each layer's weight-gradient cosine to the exact gradient")
    parser.add_argument("--fidelity-window", type=int, default=1, metavar="W",
                        help="with --fidelity-every: W consecutive steps from every N-th; also the cosine of their sum")
    parser.add_argument("--expected-gradient", type=int, nargs=2, metavar=("STEP", "DRAWS"),
                        help="train to STEP, then compare the mean of DRAWS gradients with the exact one")
    parser.add_argument("--signed-clip", choices=tuple(SIGNED_CLIPS), default="sawb",
                        help="how signed activations are clipped (an ablation of the library's default, sawb)")
    args = parser.parse_args(argv)
    if args.fidelity_every and not 1 <= args.fidelity_window <= args.fidelity_every:
        parser.error("--fidelity-window must be between 1 and --fidelity-every")
    torch.set_num_threads(1)
    with signed_clip(args.signed_clip):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.expected_gradient:
        step, draws = args.expected_gradient
        for name in args.variants:
            probe = ExpectedGradient(step, draws)
            run_lm(VARIANTS[name], args.seed, LMConfig(max_steps=step + 1, eval_bytes=2 ** 12), progress=False,
                   inspect=probe)
            print(f"\n`{name}` (seed {args.seed}, step {step}): mean of {draws} gradients against the exact "
                  f"gradient\n\n{probe.table()}", flush=True)
        return 0
    if args.fidelity_every:
        for name in args.variants:
            fidelity = Fidelity(args.fidelity_every, args.fidelity_window)
            result = run_lm(VARIANTS[name], args.seed, LMConfig(eval_bytes=2 ** 18), progress=False,
                            inspect=fidelity)
            print(f"\n`{name}` (seed {args.seed}, WikiText-2 ppl {result['ppl']:.2f}): weight-gradient cosine "
                  f"to the exact gradient\n\n{fidelity.table()}", flush=True)
        return 0
    print("| variant | operands | WikiText-2 ppl (per byte) | minutes |")
    print("|---|---|---|---|")
    for name in args.variants:
        begin = time.perf_counter()
        result = run_lm(VARIANTS[name], args.seed, LMConfig(eval_bytes=2 ** 18), progress=False)
        print(f"| `{name}` | {VARIANTS[name].summary} | {result['ppl']:.2f} | {(time.perf_counter() - begin) / 60:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
