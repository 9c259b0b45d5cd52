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
