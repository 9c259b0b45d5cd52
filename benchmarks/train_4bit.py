"""4-bit training benchmark (issue 5): every recipe × seeds on Fashion-MNIST and the byte-level LM.

Each finished run is appended to a JSON-lines file, so an interrupted benchmark resumes where it
stopped; the tables are printed from that file. Step-time ratios divide a recipe's median step
time by the fp32 run of the same task and seed, run in the same process just before it.

    NIBBLE_DATA=../shared/data nice -n 10 python benchmarks/train_4bit.py --tasks fashion-mnist lm
    python benchmarks/train_4bit.py --table-only
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nibble.train import RECIPES, prepare
from nibble.train.tasks.fashion_mnist import FashionConfig, SmallCNN, load_split, run_fashion_mnist
from nibble.train.tasks.lm import LMConfig, run_lm

METRIC = {"fashion-mnist": ("accuracy", "test accuracy (%)"), "lm": ("ppl", "WikiText-2 perplexity (per byte)")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=tuple(METRIC), default=list(METRIC))
    parser.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fashion-epochs", type=int, default=2)
    parser.add_argument("--lm-epochs", type=int, default=1)
    parser.add_argument("--lm-eval-bytes", type=int, default=2 ** 18,
                        help="score the first N bytes of WikiText-2 test (default 262144; 0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/train_4bit.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the tables from --out and exit")
    parser.add_argument("--gradients", action="store_true",
                        help="only print how close each recipe's CNN weight gradients are to fp32's")
    return parser.parse_args(argv)


def _done(path: Path) -> dict[tuple[str, str, int], dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(row["task"], row["recipe"], row["seed"]): row for row in rows}


def _run(task: str, recipe: str, seed: int, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    if task == "fashion-mnist":
        result = run_fashion_mnist(recipe, seed, FashionConfig(epochs=args.fashion_epochs), progress=False)
    else:
        config = LMConfig(epochs=args.lm_epochs, eval_bytes=args.lm_eval_bytes or None)
        result = run_lm(recipe, seed, config, progress=False)
    result["wall_s"] = time.perf_counter() - start
    result["threads"] = torch.get_num_threads()
    return result


def run_all(args: argparse.Namespace) -> None:
    """Run what is missing from ``args.out``: per task and seed, fp32 first, then the other recipes."""
    done = _done(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    recipes = ["fp32", *[r for r in args.recipes if r != "fp32"]]
    for task in args.tasks:
        for seed in args.seeds:
            for recipe in recipes:
                if (task, recipe, seed) in done:
                    continue
                result = _run(task, recipe, seed, args)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
                metric = METRIC[task][0]
                print(f"{task} {recipe} seed {seed}: {metric} {result[metric]:.3f}, "
                      f"{1000 * result['step_cpu_s']:.0f} ms CPU/step, {result['wall_s']:.0f} s", flush=True)


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {spread:.2f}"


def _ratios(runs: list[tuple[int, dict]], baseline: dict[int, dict], key: str) -> str:
    ratios = [row[key] / baseline[seed][key] for seed, row in runs if seed in baseline]
    return _mean_spread(ratios) if ratios else "n/a"


def table(rows: dict[tuple[str, str, int], dict], task: str) -> str:
    """Markdown table of one task: metric and step-time ratios to fp32 of the same seed, mean ± std over seeds."""
    metric, label = METRIC[task]
    lines = [f"| recipe | {label} | Δ vs fp32 | step CPU time / fp32 | step wall time / fp32 | seeds |",
             "|---|---|---|---|---|---|"]
    baseline = {seed: row for (t, r, seed), row in rows.items() if t == task and r == "fp32"}
    base_metric = statistics.fmean(row[metric] for row in baseline.values()) if baseline else None
    for recipe in RECIPES:
        runs = sorted((seed, row) for (t, r, seed), row in rows.items() if t == task and r == recipe)
        if not runs:
            continue
        values = [row[metric] for _, row in runs]
        delta = f"{statistics.fmean(values) - base_metric:+.2f}" if base_metric is not None else "n/a"
        ratios = [_ratios(runs, baseline, key) for key in ("step_cpu_s", "step_time_s")]
        lines.append(f"| `{recipe}` | {_mean_spread(values)} | {delta} | {' | '.join(ratios)} | {len(runs)} |")
    return "\n".join(lines)


def gradient_fidelity(seed: int = 0, warmup_steps: int = 100, batches: int = 4) -> str:
    """Markdown table: cosine similarity (and norm ratio) of each conv layer's weight gradient under
    every recipe to the fp32 gradient, on Fashion-MNIST batches after a short fp32 warm-up."""
    train = load_split(None, "train")
    torch.manual_seed(seed)
    base = SmallCNN()
    optimizer = torch.optim.AdamW(base.parameters(), 3e-3)
    for _ in range(warmup_steps):
        index = torch.randint(0, train.labels.numel(), (64,))
        loss = F.cross_entropy(base(train.images[index]), train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch = torch.randint(0, train.labels.numel(), (batches, 64), generator=torch.Generator().manual_seed(seed))

    def conv_grads(recipe: str) -> list[torch.Tensor]:
        model = prepare(copy.deepcopy(base), recipe)
        for index in batch:
            F.cross_entropy(model(train.images[index]), train.labels[index]).backward()
        return [p.grad for p in model.parameters() if p.ndim == 4]

    reference = conv_grads("fp32")
    layers = " | ".join(f"conv{i + 1}" for i in range(len(reference)))
    lines = [f"| recipe | {layers} |", "|---" * (len(reference) + 1) + "|"]
    for recipe in RECIPES:
        cells = [f"{F.cosine_similarity(g.flatten(), r.flatten(), 0):.3f} ({g.norm() / r.norm():.2f})"
                 for g, r in zip(conv_grads(recipe), reference)]
        lines.append(f"| `{recipe}` | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gradients:
        print(gradient_fidelity())
        return 0
    if not args.table_only:
        run_all(args)
    rows = _done(args.out)
    for task in args.tasks:
        print(f"\n### {task}\n\n{table(rows, task)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
