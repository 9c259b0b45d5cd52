"""How much of each quantized layer's weight gradient is signal, per tokens per step.

The V step of PV-Tuning can only move a group's codes usefully where the group's gradient points
the same way from batch to batch. This script takes K gradients dL/dŴ of the token KL to the
teacher, each on its own batch of training windows, at a fixed student, and prints per layer kind
the signal/noise energy ratio at 4,096 and 32,768 tokens per gradient, the tokens per gradient
at which the ratio reaches 1, and the fraction of weight groups above 1 at 4,096 tokens. (An
8-weight group's signal estimate has a spread of about N/(2K), N its noise energy per gradient:
with K = 8 gradients of 1,024 tokens, a ratio of 1 at 4,096 tokens means a signal of N/4, four
spreads, but at 32,768 tokens N/32, half of one, so groups are counted at 4,096 tokens only.)

    NIBBLE_DATA=../shared/data python benchmarks/pv_gradient_snr.py runs/q/aqlm-2x8 runs/pv/aqlm-ste-b16-s1 \
        --samples 8 --batch-size 4 --seqlen 256 --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from nibble.models import load_model, load_tokenizer
from nibble.tune import PVTuner, TeacherOutputs, TuneConfig, TuneData
from nibble.tune.run import batch_indices
from nibble.tune.snr import GradientMoments, GradientSNR, gradient_snr

TEACHER = "smollm2-135m"
REPORT_TOKENS = (4096, 32768)
GROUP_TOKENS = 4096


def layer_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def measure(student_dir: str, args) -> dict[str, GradientSNR]:
    """Per layer kind (and ``all``), the statistics of ``args.samples`` batch gradients."""
    tokenizer, student = load_tokenizer(student_dir), load_model(student_dir)
    teacher = load_model(args.teacher)
    train, _ = TuneData(args.calib, args.nsamples, args.seqlen, 0, args.seed).windows(tokenizer)
    tuner = PVTuner(student, TeacherOutputs(teacher, train), train, TuneConfig(batch_size=args.batch_size))
    moments = defaultdict(GradientMoments)
    for k in tqdm(range(args.samples), desc=f"gradients of {student_dir}"):
        for name, grad in tuner.dense_gradients(batch_indices(k, args.batch_size, len(train), args.seed)).items():
            moments[name].add(grad)
    tokens = args.batch_size * args.seqlen
    per_layer = {name: gradient_snr(m, tuner.layers[name].group_shape, tokens) for name, m in moments.items()}
    kinds = defaultdict(list)
    for name, stats in per_layer.items():
        kinds[layer_kind(name)].append(stats)
    out = {kind: GradientSNR.combine(parts) for kind, parts in kinds.items()}
    out["all"] = GradientSNR.combine(list(per_layer.values()))
    return out


def print_table(student_dir: str, stats: dict[str, GradientSNR], seconds: float) -> None:
    heads = [f"S/N at {t:,}" for t in REPORT_TOKENS] + ["tokens for S/N = 1"]
    heads += [f"groups S/N > 1 at {GROUP_TOKENS:,}"]
    print(f"\n{student_dir} ({seconds / 60:.1f} min)\n")
    print("| layers | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for kind, s in stats.items():
        cells = [f"{s.ratio(t):.3f}" for t in REPORT_TOKENS] + [f"{s.tokens_for_ratio():,.0f}"]
        cells += [f"{100 * s.groups_above(GROUP_TOKENS):.2f}%"]
        print(f"| {kind} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("students", nargs="+", help="nibble folders of quantized (or tuned) models")
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--samples", type=int, default=16, help="gradients, each on its own batch")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per gradient")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--nsamples", type=int, default=256, help="training windows to draw batches from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.samples * args.batch_size > args.nsamples:
        parser.error("--samples x --batch-size must not exceed --nsamples (batches must be disjoint)")
    if args.threads:
        torch.set_num_threads(args.threads)
    for student_dir in args.students:
        started = time.perf_counter()
        stats = measure(student_dir, args)
        print_table(student_dir, stats, time.perf_counter() - started)


if __name__ == "__main__":
    main()
