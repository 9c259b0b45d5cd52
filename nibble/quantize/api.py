"""``quantize_(model, config)``: one entry point for every method, in memory or into a folder."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble.calibrate.pipeline import BlockReport, calibrate_model
from nibble.data import load_text, sample_windows, tokenize_corpus
from nibble.eval.size import size_report
from nibble.formats.checkpoint import PartialRun, prepare_output_dir, save_quantized
from nibble.quantize.base import METHODS, QuantConfig
from nibble.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration windows come from: ``dataset`` (c4, wikitext2 or a file), N windows of L tokens."""

    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8

    def windows(self, tokenizer) -> torch.Tensor:
        ids = tokenize_corpus(tokenizer, load_text(self.dataset, split="train"))
        return sample_windows(ids, self.nsamples, self.seqlen, self.seed)


def make_quantizer(config: QuantConfig):
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}")
    return METHODS[config.method][1](config)


def quantize_(model: nn.Module, config: QuantConfig, windows: torch.Tensor | None = None, *,
              batch_size: int = 8, offload: bool = False, progress: bool = True) -> list[BlockReport]:
    """Quantize ``model``'s decoder blocks in place with ``config`` on calibration ``windows``."""
    quantizer = make_quantizer(config)
    torch.manual_seed(getattr(config, "seed", 0))
    return calibrate_model(model, quantizer, windows, batch_size=batch_size, offload=offload, progress=progress)


def quantize_to_dir(model: nn.Module, tokenizer, source: str, config: QuantConfig,
                    calibration: CalibrationConfig, out_dir: str | Path, *, resume: bool = False,
                    offload: bool = False, progress: bool = True) -> dict[str, Any]:
    """Quantize ``model`` block by block into ``out_dir``, checkpointing after every block.

    With ``resume`` a run interrupted in ``out_dir`` continues after its last finished block.
    Returns the summary written into ``nibble_config.json``.
    """
    quantizer = make_quantizer(config)
    out = prepare_output_dir(out_dir, resume)
    run_config = {"source": source, "quantization": config.to_dict(), "calibration": asdict(calibration)}
    partial = PartialRun(out, run_config)
    first_block = partial.restore(model) if resume else 0
    if not resume:
        partial.start()
    needs_data = quantizer.needs_hessian or quantizer.needs_block_targets
    windows = calibration.windows(tokenizer) if needs_data else None
    torch.manual_seed(getattr(config, "seed", 0))
    started = time.perf_counter()
    reports = calibrate_model(
        model, quantizer, windows, batch_size=calibration.batch_size, offload=offload, progress=progress,
        first_block=first_block, on_block_done=lambda i, block, report: partial.save_block(i, block),
    )
    seconds = time.perf_counter() - started
    size = size_report(model)
    meta = {**run_config, "size": size.to_dict(), "seconds_this_run": seconds,
            "resumed_from_block": first_block,
            "layer_errors": {f"{r.index}.{k}": v for r in reports for k, v in r.layer_errors.items()}}
    summary = save_quantized(model, tokenizer, out, meta)
    partial.remove()
    log.info("wrote %s: %.3f bits per quantized weight", out, size.bits_per_weight)
    return summary
