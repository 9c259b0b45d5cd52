"""The kernel benchmark runs end to end on a tiny shape."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def test_benchmark_prints_a_row_per_backend(cpu_kernels, capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("nibble_kernel_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.main(["--shapes", "64x256", "--batch", "1,3", "--formats", "2x8,4bit", "--rounds", "1",
                 "--sample-ms", "0.1", "--backends", "cpu-lut,cpu-scalar,reference", "--threads", "1"])
    out = capsys.readouterr().out
    for label in ("dense float32", "aqlm 2x8 cpu-lut", "aqlm 2x8 reference", "4bit cpu-scalar", "4bit reference"):
        assert out.count(label) == 2, out
