"""Small helpers shared by the CLI subcommands."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def print_json_last(payload: dict[str, Any]) -> None:
    """Print ``payload`` as the last line of output (machine-readable)."""
    sys.stdout.flush()
    print(json.dumps(payload, sort_keys=True))


def add_head_arguments(parser) -> None:
    """``--head-bits`` / ``--head-group-size``: round a float output head (``nibble.runtime.head``)."""
    parser.add_argument("--head-bits", type=int, default=None, choices=(8, 4),
                        help="round the float output head to 8- or 4-bit integers first (as for fast decoding)")
    parser.add_argument("--head-group-size", type=int, default=None,
                        help="inputs per scale of the rounded head (default: a row at 8 bits, 64 at 4 bits)")


def apply_head_arguments(model, args) -> None:
    """Round ``model``'s output head in place when ``--head-bits`` was given."""
    if args.head_bits:
        from nibble.runtime.head import quantize_head

        quantize_head(model, args.head_bits, args.head_group_size)
