"""Block-by-block calibration: the engine every post-training quantizer runs on.

1. Capture the inputs of the first decoder block for the calibration windows (and the keyword
   arguments the model passes to its blocks: masks, rotary embeddings).
2. For each block: run the full-precision block once to accumulate, for every linear layer, the
   input second-moment matrix H = XᵀX / N (float32 products, float64 accumulation; layers that
   read the same input share one H), and, when the quantizer asks, keep the block's outputs as
   targets; replace each linear layer by the quantizer's module; let the quantizer fine-tune the
   block; then run the *quantized* block to produce the next block's inputs.
3. After each block, write it to the checkpoint folder so an interrupted run resumes where it
   stopped (see ``nibble.formats.checkpoint``).

Only one block's activations are alive at a time (inputs, optional targets); with
``offload=True`` they live on the CPU between uses when the model runs on an accelerator.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from nibble.errors import NonFiniteError
from nibble.models.architecture import decoder_blocks, linear_layers, set_submodule
from nibble.quantize.base import LayerQuantizer

log = logging.getLogger(__name__)


@dataclass
class BlockData:
    """What a quantizer sees of one decoder block's calibration data.

    ``inputs`` are the block's inputs (outputs of the already-quantized blocks before it), one
    [batch, seqlen, hidden] tensor per microbatch, possibly offloaded to CPU; ``targets`` are the
    full-precision block's outputs on the same inputs (only kept when the quantizer asks for them);
    ``run(block, hidden)`` runs a block on one microbatch with the model's attention arguments.
    """

    inputs: list[torch.Tensor]
    targets: list[torch.Tensor] | None
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    device: torch.device


@dataclass
class BlockReport:
    """What happened to one block: per-layer relative output errors and timings."""

    index: int
    seconds: float
    layer_errors: dict[str, float] = field(default_factory=dict)
    finetune: dict[str, float] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int,
                         offload: bool) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Inputs of the first decoder block, in microbatches, and the keyword arguments it receives.

    Windows are pushed one at a time so captured keyword tensors (rotary tables, masks) have batch
    dimension 1 and broadcast over any microbatch size.
    """
    block = decoder_blocks(model)[0]
    device = next(model.parameters()).device
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured["hidden"] = hidden
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    rows: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for window in windows:
                try:
                    model(input_ids=window[None].to(device), use_cache=False)
                except _StopForward:
                    rows.append(captured["hidden"].detach())
    finally:
        handle.remove()
    store = "cpu" if offload else device
    inputs = [torch.cat(rows[i : i + batch_size]).to(store) for i in range(0, len(rows), batch_size)]
    return inputs, captured["kwargs"]


def make_block_runner(kwargs: dict[str, Any]) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A function running any decoder block on a hidden-state batch with the captured arguments."""

    def run(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    return run


class HessianAccumulator:
    """Forward hooks summing XᵀX (float64) for each linear layer of a block, shared by input."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._last: tuple[int, torch.Tensor] | None = None  # (input id, its XᵀX) for sharing
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach().flatten(0, -2)
            if self._last is not None and self._last[0] is args[0]:
                product = self._last[1]
            else:
                xf = x.float()
                product = (xf.T @ xf).double()
                self._last = (args[0], product)
            if name in self.sums:
                self.sums[name] += product
                self.counts[name] += x.shape[0]
            else:
                self.sums[name] = product.clone()
                self.counts[name] = x.shape[0]
        return hook

    def finish(self) -> dict[str, torch.Tensor]:
        """Remove hooks; return H = XᵀX / N per layer."""
        for handle in self._handles:
            handle.remove()
        self._last = None
        return {name: total / self.counts[name] for name, total in self.sums.items()}


def check_finite(tensors: list[torch.Tensor], what: str) -> None:
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(f"NaN or Inf in {what}")


@torch.no_grad()
def run_block_over(block: nn.Module, run, inputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The block's outputs for every microbatch, stored where the inputs were."""
    return [run(block, x.to(device)).to(x.device) for x in inputs]


def relative_output_error(layer: nn.Module, reference: nn.Linear, hessian: torch.Tensor | None) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² computed from H; plain weight error when no H is available."""
    with torch.no_grad():
        weight = reference.weight.detach().float()
        delta = (weight - layer.dequantize().to(weight.device)).double()
        if hessian is None:
            return (delta.pow(2).sum() / weight.double().pow(2).sum().clamp_min(1e-30)).item()
        h = hessian.to(delta.device)
        num = torch.einsum("oi,ij,oj->", delta, h, delta)
        den = torch.einsum("oi,ij,oj->", weight.double(), h, weight.double()).clamp_min(1e-30)
        return (num / den).item()


def quantize_block(block: nn.Module, quantizer: LayerQuantizer, data: BlockData,
                   index: int, progress: bool = True) -> BlockReport:
    """Replace every linear layer of ``block`` by its quantized version, then fine-tune the block."""
    start = time.perf_counter()
    layers = linear_layers(block)
    hessians: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
    if quantizer.needs_hessian or quantizer.needs_block_targets:
        accumulator = HessianAccumulator(layers) if quantizer.needs_hessian else None
        targets = []
        with torch.no_grad():
            for x in data.inputs:
                y = data.run(block, x.to(data.device))
                if quantizer.needs_block_targets:
                    targets.append(y.to(x.device))
        if accumulator is not None:
            hessians.update(accumulator.finish())
            check_finite(list(hessians.values()), f"calibration activations of block {index}")
        data.targets = targets if quantizer.needs_block_targets else None
    report = BlockReport(index, 0.0)
    bar = tqdm(layers.items(), desc=f"block {index}", disable=not progress, leave=False)
    for name, linear in bar:
        quantized = quantizer.quantize_layer(name, linear, hessians[name])
        report.layer_errors[name] = relative_output_error(quantized, linear, hessians[name])
        bar.set_postfix(layer=name, rel_err=f"{report.layer_errors[name]:.2e}")
        set_submodule(block, name, quantized.to(linear.weight.device))
    report.finetune = quantizer.finetune_block(block, data) or {}
    data.targets = None
    report.seconds = time.perf_counter() - start
    return report


def calibrate_model(model: nn.Module, quantizer: LayerQuantizer, windows: torch.Tensor | None, *,
                    batch_size: int = 8, offload: bool = False, progress: bool = True,
                    on_block_done: Callable[[int, nn.Module, BlockReport], None] | None = None,
                    first_block: int = 0) -> list[BlockReport]:
    """Quantize every decoder block of ``model`` in place, in order, starting at ``first_block``.

    Blocks before ``first_block`` must already be quantized (a resumed run); the calibration data is
    replayed through them. ``on_block_done`` is called after each block (used for checkpoints).
    Data-free methods (``needs_hessian`` and ``needs_block_targets`` both False) may pass
    ``windows=None``.
    """
    blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    needs_data = quantizer.needs_hessian or quantizer.needs_block_targets
    if needs_data and windows is None:
        raise ValueError(f"{quantizer.config.method} needs calibration windows")
    inputs: list[torch.Tensor] = []
    run = None
    if needs_data:
        inputs, kwargs = capture_block_inputs(model, windows, batch_size, offload)
        check_finite(inputs, "the calibration inputs of the first block")
        run = make_block_runner(kwargs)
        for index in range(first_block):
            inputs = run_block_over(blocks[index], run, inputs, device)
    reports = []
    bar = tqdm(range(first_block, len(blocks)), desc="quantizing blocks", disable=not progress,
               initial=first_block, total=len(blocks))
    for index in bar:
        data = BlockData(inputs, None, run, device)
        report = quantize_block(blocks[index], quantizer, data, index, progress)
        if needs_data:
            inputs = run_block_over(blocks[index], run, inputs, device)
            check_finite(inputs, f"the outputs of quantized block {index}")
        worst = max(report.layer_errors.values(), default=0.0)
        bar.set_postfix(worst_rel_err=f"{worst:.2e}", s=f"{report.seconds:.1f}")
        log.info("block %d: %.1fs, worst layer rel. error %.3e", index, report.seconds, worst)
        reports.append(report)
        if on_block_done is not None:
            on_block_done(index, blocks[index], report)
    return reports
