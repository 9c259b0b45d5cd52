"""Which GEMM operand costs the byte-level LM its perplexity under 4-bit training (issue 5).

Each variant quantizes a subset of the operands of the ``ibm-fp4`` family (INT4 SAWB weights, INT4
activations, radix-4/radix-2 FP4 gradients, nearest or stochastic rounding); one seed, one epoch,
one thread, WikiText-2 perplexity per byte of the first 262,144 bytes, as ``train_4bit.py``.

    NIBBLE_DATA=../shared/data python benchmarks/train_4bit_ablation.py [--variants ...] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from nibble.train.recipes import Recipe
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
    Recipe("radix2", "radix-2 FP4 on both, nearest", **_FORWARD, dgrad_grad="log2", wgrad_grad="log2"),
    Recipe("radix2-geo", "radix-2 FP4 on both, nearest in the log domain", **_FORWARD, dgrad_grad="log2-geo",
           wgrad_grad="log2-geo"),
    Recipe("radix2-sr", "radix-2 FP4 on both, stochastic", **_FORWARD, dgrad_grad="log2-sr", wgrad_grad="log2-sr"),
)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
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
