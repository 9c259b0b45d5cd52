"""The ``nibble`` command line: the subcommands defined by the modules in ``nibble.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nibble.errors import NibbleError

COMMANDS = ("quantize", "eval", "export", "finetune", "generate", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nibble", description="Compress LLMs to 2-4 bits and measure the cost.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: all cores; 1 is fastest on a busy machine)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"nibble.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except NibbleError as exc:
        print(f"nibble: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nibble: interrupted; finished blocks are kept, rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
