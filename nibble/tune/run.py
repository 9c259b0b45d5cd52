"""``finetune_to_dir``: a whole PV-Tuning run from a nibble folder into a new one, resumable.

While it runs, ``OUT/.nibble-partial/`` holds
- ``progress.json``: run settings, steps done, seconds, validation history, best step;
- ``state.safetensors``: trained parameters and codes (float32) and the P-step Adam moments;
- ``optim_rank{R}.safetensors``: each rank's V-step moments / STE shadows (the layers it owns);
- ``best.safetensors``: parameters and codes of the best validation perplexity so far;
- ``teacher/``: cached teacher hidden states (with ``teacher_cache``).
The finished folder is a normal nibble checkpoint (same layer formats as the source) whose
``nibble_config.json`` keeps the source's metadata and adds a ``finetune`` section.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nibble.data import load_text, sample_windows, tokenize_corpus
from nibble.errors import CheckpointError, ConfigError, DatasetError, NibbleError
from nibble.eval.perplexity import windows_of
from nibble.formats.checkpoint import (PARTIAL, PROGRESS, load_tensors, prepare_output_dir, read_json,
                                       refuse_used_output_dir, save_quantized, save_tensors_atomic, write_json_atomic)
from nibble.tune.config import TuneConfig
from nibble.tune.distributed import Dist
from nibble.tune.metric import check_metric_supported
from nibble.tune.pv import PVTuner, quantized_layers
from nibble.tune.teacher import TeacherOutputs, check_compatible

log = logging.getLogger(__name__)
STATE, BEST, BEST_JSON = "state.safetensors", "best.safetensors", "best.json"


@dataclass(frozen=True)
class TuneData:
    """Calibration windows: ``nsamples`` random windows for training, drawn from the corpus minus
    its last ``holdout`` non-overlapping windows, which are kept for validation."""

    calib: str = "c4"
    nsamples: int = 256
    seqlen: int = 1024
    holdout: int = 8
    seed: int = 0

    def windows(self, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenize_corpus(tokenizer, load_text(self.calib, split="train"))
        cut = ids.numel() - self.holdout * self.seqlen
        if self.nsamples < 1 or self.seqlen < 2 or self.holdout < 0 or cut <= self.seqlen:
            raise DatasetError(f"{self.calib}: {ids.numel()} tokens do not give {self.nsamples} training "
                               f"windows plus {self.holdout} held-out windows of {self.seqlen}")
        held_out = windows_of(ids[cut:], self.seqlen) if self.holdout else ids.new_zeros(0, self.seqlen)
        return sample_windows(ids[:cut], self.nsamples, self.seqlen, self.seed), held_out


def batch_indices(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """Training windows of ``step``: consecutive slices of per-epoch seeded permutations."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[offset]))
    return out


class TuneRun:
    """Files of a run in progress under ``OUT/.nibble-partial`` (only rank 0 writes shared files)."""

    def __init__(self, out_dir: Path, run_config: dict[str, Any], dist: Dist):
        self.folder = Path(out_dir) / PARTIAL
        self.run_config, self.dist = run_config, dist

    def start(self) -> dict[str, Any]:
        progress = {"run": self.run_config, "step": 0, "seconds": 0.0, "world": self.dist.world,
                    "history": [], "validation": [], "best": None}
        if self.dist.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder / PROGRESS, progress)
        return progress

    def load(self) -> dict[str, Any]:
        progress = read_json(self.folder / PROGRESS)
        if progress.get("run") != self.run_config:
            raise CheckpointError(f"cannot resume: {self.folder} was started with different settings")
        return progress

    def save(self, tuner: PVTuner, progress: dict[str, Any]) -> None:
        save_tensors_atomic(tuner.local_optimizer_state(), self.folder / f"optim_rank{self.dist.rank}.safetensors")
        if self.dist.is_main:
            save_tensors_atomic(tuner.model_state(), self.folder / STATE)
        self.dist.barrier()
        if self.dist.is_main:
            write_json_atomic(self.folder / PROGRESS, {**progress, "world": self.dist.world})
        self.dist.barrier()

    def restore(self, tuner: PVTuner, progress: dict[str, Any]) -> None:
        if progress["step"] == 0:
            return
        tuner.load_model_state(load_tensors(self.folder / STATE))
        optimizer: dict[str, torch.Tensor] = {}
        for rank in range(progress.get("world", 1)):
            optimizer.update(load_tensors(self.folder / f"optim_rank{rank}.safetensors"))
        tuner.load_optimizer_state(optimizer)
        tuner.step = progress["step"]

    def save_best(self, tuner: PVTuner, metrics: dict[str, float]) -> None:
        if self.dist.is_main:
            save_tensors_atomic(tuner.model_state(), self.folder / BEST)
            write_json_atomic(self.folder / BEST_JSON, metrics)
        self.dist.barrier()

    def best_metrics(self) -> dict[str, float] | None:
        path = self.folder / BEST_JSON
        return read_json(path) if path.is_file() else None

    def load_best(self, tuner: PVTuner) -> None:
        tuner.load_model_state(load_tensors(self.folder / BEST))


def round_to_storage_(model: torch.nn.Module) -> None:
    """Round the quantized layers' continuous tensors to what their checkpoint stores."""
    with torch.no_grad():
        for layer in quantized_layers(model).values():
            if hasattr(layer, "round_to_storage_"):
                layer.round_to_storage_()
                continue
            for name, dtype in getattr(layer, "storage_dtypes", {}).items():
                tensor = getattr(layer, name)
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def source_meta(student: torch.nn.Module) -> dict[str, Any]:
    """The source checkpoint's metadata minus what ``save_quantized`` rewrites."""
    config = dict(getattr(student, "nibble_config", {}))
    for key in ("format_version", "float_dtype", "layers", "weights"):
        config.pop(key, None)
    return config


def check_output_dir(out: Path, resume: bool) -> None:
    """What ``prepare_output_dir`` refuses, checked without creating anything (on every rank)."""
    if resume and not (out / PARTIAL / PROGRESS).is_file():
        raise CheckpointError(f"nothing to resume in {out}: no {PARTIAL}/{PROGRESS}")
    if not resume:
        refuse_used_output_dir(out)


def _validate(tuner: PVTuner, held_out: torch.Tensor, teacher_val: TeacherOutputs | None,
              progress: dict[str, Any], run: TuneRun, best_by: str) -> None:
    if teacher_val is None:
        return
    metrics = {"step": tuner.step, **tuner.evaluate(held_out, teacher_val)}
    progress["validation"].append(metrics)
    best = progress["best"]
    if best is None or metrics[best_by] < best[best_by]:
        progress["best"] = metrics
        run.save_best(tuner, metrics)
    log.info("step %d: held-out ppl %.4f, KL %.5f", tuner.step, metrics["ppl"], metrics["kl"])


def _teacher_outputs(model, train: torch.Tensor, held_out: torch.Tensor, run: TuneRun, cache: bool,
                     dist: Dist, progress_bar: bool) -> tuple[TeacherOutputs, TeacherOutputs | None]:
    """Teacher states for training (on the fly, or cached on disk) and validation (kept in memory)."""
    teacher = TeacherOutputs(model, train, run.folder / "teacher" if cache else None)
    teacher_val = TeacherOutputs(model, held_out) if len(held_out) else None
    if teacher_val is not None:
        teacher_val.remember(dist.share(list(range(len(held_out)))))
    if cache:
        teacher.fill_cache(dist.share(list(range(len(train)))), progress=progress_bar and dist.is_main)
        dist.barrier()
        teacher.release_model()
        if teacher_val is not None:
            teacher_val.release_model()
    return teacher, teacher_val


def finetune_to_dir(student_dir: str, teacher_spec: str, out_dir: str | Path, config: TuneConfig,
                    data: TuneData, *, resume: bool = False, eval_every: int = 25, save_every: int = 25,
                    teacher_cache: bool = False, best_by: str = "ppl", device: torch.device | None = None,
                    dist: Dist | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Tune the nibble model in ``student_dir`` against ``teacher_spec``; write the result to ``out_dir``.

    Returns the ``nibble_config.json`` written. Validation perplexity and KL on the held-out
    windows are measured before tuning and every ``eval_every`` steps; the state with the lowest
    ``best_by`` (``ppl`` or ``kl``) is the one saved.
    """
    from nibble.models import load_model, load_tokenizer

    dist = dist or Dist()
    device = device or torch.device("cpu")
    config.validate()
    if best_by not in ("ppl", "kl"):
        raise ConfigError(f"cannot select the best state by {best_by!r}: use ppl or kl")
    out = Path(out_dir)
    check_output_dir(out, resume)
    dist.barrier()
    if dist.is_main:
        prepare_output_dir(out, resume)
    dist.barrier()
    tokenizer = load_tokenizer(student_dir)
    student = load_model(student_dir, device=device)
    if not quantized_layers(student):
        raise NibbleError(f"{student_dir} has no quantized layers to tune")
    check_metric_supported(config.v_metric, quantized_layers(student))  # before the run writes anything
    teacher_model = load_model(teacher_spec, device=device)
    check_compatible(student, teacher_model)
    train, held_out = data.windows(tokenizer)
    run_config = {"student": str(student_dir), "teacher": teacher_spec, "tune": config.to_dict(),
                  "data": asdict(data), "teacher_cache": teacher_cache, "best_by": best_by}
    run = TuneRun(out, run_config, dist)
    progress = run.load() if resume else run.start()
    if resume:
        progress["best"] = run.best_metrics()

    teacher, teacher_val = _teacher_outputs(teacher_model, train, held_out, run, teacher_cache, dist, progress_bar)
    del teacher_model

    tuner = PVTuner(student, teacher, train, config, dist)
    run.restore(tuner, progress)
    if tuner.step == 0 and not progress["validation"]:
        _validate(tuner, held_out, teacher_val, progress, run, best_by)
    started, seconds_before = time.perf_counter(), progress["seconds"]
    bar = tqdm(total=config.steps, initial=tuner.step, desc=f"{config.mode}-tuning", disable=not (progress_bar and dist.is_main))
    while tuner.step < config.steps:
        result = tuner.train_step(batch_indices(tuner.step, config.batch_size, len(train), data.seed))
        progress["history"].append({"step": tuner.step, **asdict(result)})
        bar.update(1)
        bar.set_postfix(kl=f"{result.loss:.4f}", changed=result.changed)
        if eval_every and (tuner.step % eval_every == 0 or tuner.step == config.steps):
            _validate(tuner, held_out, teacher_val, progress, run, best_by)
        if tuner.step % save_every == 0 or tuner.step == config.steps:
            progress.update(step=tuner.step, seconds=seconds_before + time.perf_counter() - started)
            run.save(tuner, progress)
    bar.close()
    progress.update(step=tuner.step, seconds=seconds_before + time.perf_counter() - started)
    if progress["best"] is not None:
        run.load_best(tuner)
    round_to_storage_(student)
    summary = None
    if dist.is_main:
        meta = {**source_meta(student), "finetune": {
            **run_config, "steps_done": tuner.step, "seconds": progress["seconds"], "world_size": dist.world,
            "tokens_seen": tuner.step * config.batch_size * data.seqlen, "held_out_windows": len(held_out),
            "best": progress["best"], "validation": progress["validation"],
            "before": progress["validation"][0] if progress["validation"] else None}}
        summary = save_quantized(student, tokenizer, out, meta, _float_dtype(student))
        run_folder_cleanup(run)
    dist.barrier()
    return summary if summary is not None else {}


def _float_dtype(student: torch.nn.Module) -> torch.dtype:
    name = getattr(student, "nibble_config", {}).get("float_dtype", "float16")
    return getattr(torch, name, torch.float16)


def run_folder_cleanup(run: TuneRun) -> None:
    import shutil

    shutil.rmtree(run.folder, ignore_errors=True)
