"""PV-Tuning figures on SmolLM2-135M: perplexity before and after tuning, PV against STE.

Every piece is cached as JSON under ``--work`` so the script can be stopped and rerun:

    NIBBLE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/pv_tuning.py \
        --run gptq2-pv=/work/runs/q/gptq-2-64:pv --run aqlm-pv=/work/runs/q/aqlm-2x8:pv \
        --run aqlm-ste=/work/runs/q/aqlm-2x8:ste --steps 20 --max-windows 16 --work /work/runs/pv

``--run NAME=QDIR:MODE`` tunes QDIR with MODE into WORK/NAME; the float model, each source and
each result are evaluated on WikiText-2 and C4 (seqlen 2048, the first ``--max-windows``
windows). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nibble.eval.perplexity import perplexity_on_dataset
from nibble.models import load_model, load_tokenizer
from nibble.tune import TuneConfig, TuneData, finetune_to_dir

TEACHER = "smollm2-135m"
DATASETS = ("wikitext2", "c4")


def cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=2))
    return value


def evaluate(spec: str, work: Path, label: str, seqlen: int, max_windows: int) -> dict[str, float]:
    def compute():
        tokenizer, model = load_tokenizer(spec), load_model(spec)
        out = {}
        for dataset in DATASETS:
            started = time.perf_counter()
            out[dataset] = perplexity_on_dataset(model, tokenizer, dataset, seqlen, max_windows).ppl
            out[f"{dataset}_seconds"] = time.perf_counter() - started
        return out
    return cached(work / f"eval-{label}-{seqlen}-{max_windows}.json", compute)


def tune(name: str, source: str, mode: str, work: Path, args) -> dict:
    def compute():
        config = TuneConfig(mode=mode, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            v_lr=args.v_lr if mode == "pv" else args.ste_lr,
                            tau=args.tau if mode == "pv" else 1.0, trust_ratio=args.trust_ratio,
                            schedule=args.schedule, min_lr_ratio=args.min_lr_ratio)
        data = TuneData("c4", args.nsamples, args.seqlen, args.holdout, 0)
        started = time.perf_counter()
        summary = finetune_to_dir(source, TEACHER, work / name, config, data, eval_every=args.eval_every,
                                  save_every=args.eval_every, teacher_cache=True, resume=(work / name).exists())
        tuned = summary["finetune"]
        return {"seconds": time.perf_counter() - started, "tokens_seen": tuned["tokens_seen"],
                "before": tuned["before"], "best": tuned["best"], "config": config.to_dict(),
                "data": tuned["data"]}
    return cached(work / f"tune-{name}.json", compute)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", default=[], help="NAME=QDIR:MODE (mode pv or ste)")
    parser.add_argument("--work", default="runs/pv")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--holdout", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine"])
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--v-lr", type=float, default=0.05)
    parser.add_argument("--ste-lr", type=float, default=0.01)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--trust-ratio", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [("float (teacher)", evaluate(TEACHER, work, "fp", args.eval_seqlen, args.max_windows), None)]
    for run in args.run:
        name, _, rest = run.partition("=")
        source, _, mode = rest.rpartition(":")
        label = Path(source).name
        rows.append((f"{label}", evaluate(source, work, label, args.eval_seqlen, args.max_windows), None))
        result = tune(name, source, mode, work, args)
        rows.append((f"{label} + {mode}", evaluate(str(work / name), work, name, args.eval_seqlen, args.max_windows),
                     result))
    print(f"| model | WikiText-2 | C4 | tuning wall time | tokens |\n| --- | --- | --- | --- | --- |")
    for label, ppl, result in rows:
        extra = f"{result['seconds'] / 60:.0f} min | {result['tokens_seen']}" if result else " | "
        print(f"| {label} | {ppl['wikitext2']:.3f} | {ppl['c4']:.3f} | {extra} |")


if __name__ == "__main__":
    main()
