"""Quality table: quantize the built-in model with several methods and score every result.

Each configuration is quantized with ``nibble quantize`` (skipped when its folder is already
complete; rows already in ROOT/quality.jsonl with the same windows are reused) and evaluated with ``nibble eval`` on each dataset; the table gives perplexity, bits per
quantized weight (everything counted), file size and quantization wall time.

    NIBBLE_DATA=../shared/data python benchmarks/quality.py --root runs \
        --configs fp rtn-4-128 gptq-4-128 rtn-3-128 gptq-3-128 rtn-2-64 gptq-2-64 --max-windows 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODEL = "smollm2-135m"


def quantize_args(name: str) -> list[str]:
    """CLI arguments for a configuration name: rtn-B-G, gptq-B-G, aqlm-MxB[-fast], with extra -flags."""
    method, *rest = name.split("-")
    if method in ("rtn", "gptq"):
        bits, group = rest[:2]
        args = ["--method", method, "--bits", bits, "--group-size", group]
        return args + (["--act-order"] if method == "gptq" else [])
    if method == "aqlm":
        codebooks, bits = rest[0].split("x")
        args = ["--method", "aqlm", "--codebooks", codebooks, "--bits-per-codebook", bits]
        return args + (["--fast"] if "fast" in rest else [])
    raise SystemExit(f"unknown configuration {name}")


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


THREADS: list[str] = []  # ["--threads", "N"] when --threads is given


def nibble(*args: str) -> dict:
    command = [sys.executable, "-m", "nibble.cli", *THREADS, *args, "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"nibble {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return last_json(result.stdout)


def measure(name: str, root: Path, datasets: list[str], max_windows: int | None, extra: list[str]) -> dict:
    row: dict = {"config": name}
    spec = MODEL
    if name != "fp":
        folder = root / name
        summary_file = root / f"{name}.quantize.json"
        if not (folder / "nibble_config.json").is_file():
            summary_file.write_text(json.dumps(nibble("quantize", MODEL, *quantize_args(name), *extra,
                                                      "--out", str(folder))))
        row.update(json.loads(summary_file.read_text()))
        spec = str(folder)
    for dataset in datasets:
        window_args = [] if max_windows is None else ["--max-windows", str(max_windows)]
        result = nibble("eval", spec, "--dataset", dataset, *window_args)
        row[dataset] = result["ppl"]
        row[f"{dataset}_windows"] = result["windows"]
    return row


def table(rows: list[dict], datasets: list[str]) -> str:
    header = "| config | " + " | ".join(f"{d} ppl" for d in datasets) + " | bits/weight | bits/param | file MiB | quantize s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [f"{row[d]:.3f}" for d in datasets]
        if row["config"] == "fp":
            cells += ["32 (fp32)", "32", "-", "-"]
        else:
            cells += [f"{row['bits_per_weight']:.3f}", f"{row['bits_per_parameter']:.3f}",
                      f"{row['file_bytes'] / 2**20:.1f}", f"{row['seconds']:.0f}"]
        lines.append(f"| {row['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def previous_rows(path: Path, datasets: list[str]) -> dict[str, dict]:
    """Rows measured by an earlier run into the same root (the last one per configuration)."""
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["config"]: row for row in rows if all(d in row for d in datasets)}


FULL_WINDOWS = {"wikitext2": 148, "c4": 121}  # at seqlen 2048, the shared data's test splits


def expected_windows(dataset: str, max_windows: int | None) -> int | None:
    full = FULL_WINDOWS.get(dataset)
    if max_windows is None:
        return full
    return max_windows if full is None else min(full, max_windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs"))
    parser.add_argument("--configs", nargs="+", default=["fp", "rtn-4-128", "gptq-4-128"])
    parser.add_argument("--datasets", nargs="+", default=["wikitext2", "c4"])
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--quantize-args", default="", help="extra arguments for nibble quantize")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per nibble call")
    args = parser.parse_args()
    if args.threads is not None:
        THREADS[:] = ["--threads", str(args.threads)]
    args.root.mkdir(parents=True, exist_ok=True)
    done = previous_rows(args.root / "quality.jsonl", args.datasets)
    rows = []
    for name in args.configs:
        row = done.get(name)
        if row is None or any(row.get(f"{d}_windows") != expected_windows(d, args.max_windows) for d in args.datasets):
            row = measure(name, args.root, args.datasets, args.max_windows, args.quantize_args.split())
            with open(args.root / "quality.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
        rows.append(row)
        print(table(rows, args.datasets), flush=True)


if __name__ == "__main__":
    main()
