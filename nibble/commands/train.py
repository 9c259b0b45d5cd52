"""``nibble train --task fashion-mnist|lm --recipe R``: train a small model in 4 bits (or fp32)."""

from __future__ import annotations

import argparse

from nibble.commands.common import print_json_last

TASKS = ("fashion-mnist", "lm")
DEFAULT_EPOCHS = {"fashion-mnist": 2, "lm": 1}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from nibble.train.recipes import RECIPES

    parser = subparsers.add_parser(
        "train", help="train a small CNN or LM under a 4-bit training recipe",
        description="Train the Fashion-MNIST CNN or the byte-level LM with every GEMM in the recipe's formats.")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--recipe", required=True, choices=tuple(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="fashion-mnist: 2, lm: 1 (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="end with a JSON line: accuracy or ppl, loss, step time")
    parser.add_argument("--keep", default=None,
                        help="comma-separated layers kept in fp32 (module names, fnmatch patterns, 'first', "
                             "'last'; 'none' quantizes all); default: the recipe's (first and last)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="fashion-mnist: folder with the IDX files (default /usr/share/datasets/fashion-mnist)")
    data.add_argument("--subset", type=int, default=None, help="fashion-mnist: train on the first N images")
    data.add_argument("--max-steps", type=int, default=None, help="lm: stop after N optimizer steps")
    data.add_argument("--eval-bytes", type=int, default=None, help="lm: score only the first N bytes of WikiText-2")
    parser.set_defaults(func=run)
    return parser


def _keep(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [] if value.strip().lower() == "none" else [part.strip() for part in value.split(",") if part.strip()]


def _positive(name: str, value: int | None) -> None:
    from nibble.errors import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"--{name} must be at least 1, got {value}")


def run(args) -> int:
    import torch

    from nibble.train.tasks.fashion_mnist import FashionConfig, run_fashion_mnist
    from nibble.train.tasks.lm import LMConfig, run_lm

    for name in ("epochs", "threads", "subset", "max_steps", "eval_bytes"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or DEFAULT_EPOCHS[args.task]
    if args.task == "fashion-mnist":
        config = FashionConfig(epochs=epochs, subset=args.subset, data=args.data)
        result = run_fashion_mnist(args.recipe, args.seed, config, _keep(args.keep))
        print(f"fashion-mnist / {args.recipe} / seed {args.seed}: test accuracy {result['accuracy']:.2f}%")
    else:
        config = LMConfig(epochs=epochs, max_steps=args.max_steps, eval_bytes=args.eval_bytes)
        result = run_lm(args.recipe, args.seed, config, _keep(args.keep))
        print(f"lm / {args.recipe} / seed {args.seed}: WikiText-2 perplexity {result['ppl']:.3f} per byte")
    print(f"final training loss {result['loss']:.4f}, {result['steps']} steps, "
          f"median step {1000 * result['step_time_s']:.1f} ms ({1000 * result['step_cpu_s']:.1f} ms CPU), "
          f"{len(result['quantized_layers'])} quantized layers")
    if args.json:
        print_json_last(result)
    return 0
