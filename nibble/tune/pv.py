"""PV-Tuning: the whole quantized student against a float teacher, continuous and discrete parts.

One training step on a global batch of windows:

1. forward + backward of the token-level KL(teacher ‖ student) on every microbatch (blocks
   checkpointed); the gradients of the continuous parameters land in ``.grad`` and the gradient
   of every quantized layer's *dense* weight Ŵ is tapped on its way through ``dequantize()``;
2. P step: Adam (or LAMB) on the continuous parameters, codes fixed;
3. V step (every ``v_every`` steps): for each quantized layer, a target Y = Ŵ − step (``pv``) or
   the straight-through shadow weight (``ste``), then ``vstep.v_step`` re-encodes the chosen
   fraction of groups. Formats are only used through the ``QuantizedLinear`` contract.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nibble.formats.base import QuantizedLinear
from nibble.models import decoder_blocks
from nibble.tune.config import TuneConfig
from nibble.tune.distributed import Dist
from nibble.tune.kl import Head, chunked_kl, chunked_nll
from nibble.tune.metric import InputStatistics, check_metric_supported
from nibble.tune.optim import NamedAdam
from nibble.tune.teacher import TeacherOutputs, final_hidden
from nibble.tune.vstep import VStepStats, v_step


# --- the dense weights of one step -----------------------------------------------------------
def _dense_forward(layer: QuantizedLinear, tuner: "PVTuner", name: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward on the step's decoded weight (a leaf whose ``.grad`` is dL/dŴ)."""
    weight = tuner.decoded(name)
    if tuner.inputs.wanted(tuner.step) and torch.is_grad_enabled():
        tuner.inputs.record(name, x)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, weight.to(x.dtype), bias)


def _checkpointed_forward(original, *args, **kwargs):
    if not torch.is_grad_enabled():
        return original(*args, **kwargs)
    return checkpoint(original, *args, use_reentrant=False, **kwargs)


# --- parameter selection ---------------------------------------------------------------------
def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def trainable_parameters(model: nn.Module, config: TuneConfig) -> dict[str, nn.Parameter]:
    """The continuous parameters the P step trains; ``requires_grad`` is set accordingly."""
    chosen: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, QuantizedLinear):
                wanted = pname != "bias" or config.train_norms
            elif "norm" in type(module).__name__.lower():
                wanted = config.train_norms
            else:
                wanted = config.train_non_quantized
            if wanted and param.is_floating_point() and all(param is not p for p in chosen.values()):
                chosen[name] = param
    for param in model.parameters():
        param.requires_grad_(any(param is p for p in chosen.values()))
    return chosen


@dataclass
class StepResult:
    loss: float              # mean token KL of the step's batch
    changed: int = 0         # groups re-encoded to new values (all layers, all ranks)
    groups: int = 0
    relative_change: float = 0.0  # largest ‖ΔŴ‖/‖Ŵ‖ over layers


class PVTuner:
    """Holds the student, its optimizers and the hooks; ``train_step`` runs one P(+V) step.

    Each quantized layer is decoded once per step into a dense leaf tensor that every microbatch's
    forward (and every checkpoint recomputation) uses; its ``.grad`` is dL/dŴ summed over the
    batch. The gradients of the layer's continuous parameters then take a single
    vector-Jacobian product through ``dequantize()``.
    """

    def __init__(self, student: nn.Module, teacher: TeacherOutputs, windows: torch.Tensor,
                 config: TuneConfig, dist: Dist | None = None):
        self.student, self.teacher, self.windows = student, teacher, windows
        self.config = config.validate()
        self.dist = dist or Dist()
        self.device = next(student.parameters()).device
        self.layers = quantized_layers(student)
        self.params = trainable_parameters(student, config)
        self.layer_params = {name: [p for p in layer.parameters(recurse=False) if p.requires_grad]
                             for name, layer in self.layers.items()}
        self.p_opt = NamedAdam(config.lr, config.betas, lamb=config.lamb)
        self.v_opt = NamedAdam(config.v_lr, config.v_betas)
        self.shadows: dict[str, torch.Tensor] = {}  # ste: the dense shadow weights
        self.residuals: dict[str, torch.Tensor] = {}  # pv with v_memory: decayed Y − Ŵ_new
        self.dense: dict[str, torch.Tensor] = {}
        check_metric_supported(config.v_metric, self.layers)
        self.inputs = InputStatistics(config.v_metric)  # defines the V step's re-encoding metric
        self.step = 0
        self._install_hooks()
        if config.mode == "ste":
            for name in self.owned_layers():
                self.shadows[name] = self.layers[name].dequantize().detach().clone().float()

    # --- setup --------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for name, layer in self.layers.items():
            layer.forward = functools.partial(_dense_forward, layer, self, name)
        if self.config.checkpointing:
            for block in decoder_blocks(self.student):
                block.forward = functools.partial(_checkpointed_forward, block.forward)

    def owned_layers(self) -> list[str]:
        return [name for i, name in enumerate(self.layers) if self.dist.owner(i) == self.dist.rank]

    def decoded(self, name: str) -> torch.Tensor:
        """Ŵ of layer ``name`` for the current codes and parameters (decoded once, then reused)."""
        if name not in self.dense:
            with torch.no_grad():
                self.dense[name] = self.layers[name].dequantize().detach().float().clone()
        return self.dense[name]

    # --- one step -----------------------------------------------------------------------------
    def microbatches(self, indices: list[int]) -> list[list[int]]:
        size = self.config.microbatch_size
        return [indices[s : s + size] for s in range(0, len(indices), size)]

    def train_step(self, indices: list[int]) -> StepResult:
        """One P step (and V step when due) on the global batch of training windows ``indices``."""
        tau = self.config.effective_tau
        do_v = tau > 0 and self.step >= self.config.v_start and self.step % self.config.v_every == 0
        track_only = tau > 0 and not do_v  # keep the V-step moments current
        factor = self.config.lr_factor(self.step)
        self.p_opt.lr, self.v_opt.lr = self.config.lr * factor, self.config.v_lr * factor
        loss, grads = self._backward(indices, do_v or track_only or any(self.layer_params.values()))
        self.p_opt.step(self.params)
        self.dense.clear()
        result = StepResult(loss)
        if do_v:
            self._v_steps(grads, result)
        elif track_only:
            for name, grad in grads.items():
                self.v_opt.direction(name, grad)
        self.step += 1
        return result

    def dense_gradients(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """dL/dŴ of the mean token KL on the batch ``indices`` for every quantized layer this rank
        owns (summed over ranks), without changing the student or the optimizers."""
        _, grads = self._backward(indices, True, into_params=False)
        for p in self.params.values():  # the norms' gradients from the backward pass
            p.grad = None
        return grads

    def _backward(self, indices: list[int], dense_grad: bool, into_params: bool = True
                  ) -> tuple[float, dict[str, torch.Tensor]]:
        """Forward and backward of the batch's KL: its mean token KL and the owned layers' dL/dŴ
        (with ``into_params``, the continuous parameters' gradients are in ``.grad``, summed over ranks)."""
        for p in self.params.values():
            p.grad = None
        for name in self.layers:
            self.decoded(name).requires_grad_(dense_grad)
            self.dense[name].grad = None
        tokens = len(indices) * self.windows.shape[1]
        loss = 0.0
        for batch in self.dist.share(self.microbatches(indices)):
            kl = self._kl(self.windows[batch].to(self.device), self.teacher.get(batch))
            (kl / tokens).backward()
            loss += kl.item()
        (loss,) = self.dist.sum_scalars(loss)
        grads = self._reduce_layer_grads(into_params)
        if into_params:
            self._all_reduce_grads()
        return loss / tokens, grads

    def _kl(self, ids: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        hidden = final_hidden(self.student, ids)
        return chunked_kl(hidden, Head.of(self.student), teacher_hidden, self.teacher.head,
                          self.config.kl_rows, self.config.kl_cols)

    def _reduce_layer_grads(self, into_params: bool = True) -> dict[str, torch.Tensor]:
        """Sum each dL/dŴ onto the layer's owner, which (with ``into_params``) backpropagates it
        through ``dequantize()`` into the layer's scales / codebooks and shares those gradients.
        Returns the owned dL/dŴ."""
        grads = {}
        for index, (name, layer) in enumerate(self.layers.items()):
            owner, dense = self.dist.owner(index), self.dense[name]
            grad = self.dist.reduce_to_(dense.grad if dense.grad is not None else torch.zeros_like(dense), owner)
            if owner == self.dist.rank:
                grads[name] = grad
                if self.layer_params[name] and into_params:
                    torch.autograd.backward(layer.dequantize(), grad)
            if not into_params:
                continue
            for p in self.layer_params[name]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.broadcast_(p.grad, owner)
        return grads

    def _all_reduce_grads(self) -> None:
        """Sum the gradients of the parameters outside quantized layers over ranks."""
        if not self.dist.active:
            return
        owned_by_layers = {id(p) for ps in self.layer_params.values() for p in ps}
        params = [p for p in self.params.values() if id(p) not in owned_by_layers]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not params:
            return
        flat = self.dist.all_reduce_(torch.cat([p.grad.flatten().float() for p in params]))
        for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))

    # --- V step -------------------------------------------------------------------------------
    @torch.no_grad()
    def _v_steps(self, grads: dict[str, torch.Tensor], result: StepResult) -> None:
        changed = 0
        for index, (name, layer) in enumerate(self.layers.items()):
            owner = self.dist.owner(index)
            if owner == self.dist.rank:
                stats = self._v_step_layer(name, layer, grads.pop(name))
                changed += stats.changed
                result.relative_change = max(result.relative_change, stats.relative_change)
            for buffer in layer.buffers(recurse=False):
                self.dist.broadcast_(buffer, owner)
            if self.dist.active:
                self.dense.pop(name, None)
        (changed,) = self.dist.sum_scalars(changed)
        result.changed, result.relative_change = int(changed), self.dist.max_scalar(result.relative_change)
        result.groups = sum(layer.group_shape[0] * layer.group_shape[1] for layer in self.layers.values())

    def _v_step_layer(self, name: str, layer: QuantizedLinear, grad: torch.Tensor) -> VStepStats:
        current = self.decoded(name)
        direction = self.v_opt.direction(name, grad)
        move = direction.mul_(self.v_opt.lr * current.pow(2).mean().sqrt())
        if self.config.mode == "ste":
            target = self.shadows[name].sub_(move)
        else:
            target = current.sub(move)
            if name in self.residuals:
                target.add_(self.residuals[name])
        del move, direction
        stats = v_step(layer, target, self.config.effective_tau, self.config.trust_ratio, current=current,
                       grad=grad if self.config.v_select == "gain" else None,
                       metric=self.inputs.project_kwargs(name))
        if self.config.mode == "pv" and self.config.v_memory > 0:
            self.residuals[name] = target.sub_(stats.weight).mul_(self.config.v_memory)
        self.dense[name] = stats.weight
        return stats

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor, teacher: TeacherOutputs) -> dict[str, float]:
        """Held-out perplexity (true next tokens) and mean token KL to the teacher."""
        nll = kl = 0.0
        head = Head.of(self.student)
        for index in self.dist.share(list(range(windows.shape[0]))):
            ids = windows[index : index + 1].to(self.device)
            hidden = final_hidden(self.student, ids)
            nll += chunked_nll(hidden[:, :-1], head, ids[:, 1:], self.config.kl_rows, self.config.kl_cols).item()
            kl += chunked_kl(hidden, head, teacher.get([index]), teacher.head,
                             self.config.kl_rows, self.config.kl_cols).item()
        nll, kl = self.dist.sum_scalars(nll, kl)
        count, length = windows.shape
        mean_nll = nll / (count * (length - 1))
        return {"ppl": float(torch.tensor(mean_nll).exp()), "nll": mean_nll, "kl": kl / (count * length)}

    # --- state for checkpoints ----------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """What tuning changes: the trained parameters and the quantized layers' buffers (codes)."""
        state = {name: p.detach() for name, p in self.params.items()}
        for lname, layer in self.layers.items():
            for bname, buffer in layer.named_buffers(recurse=False):
                if buffer is not None:
                    state[f"{lname}.{bname}"] = buffer
        return state

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        current = self.model_state()
        missing = set(current) - set(state)
        if missing:
            raise KeyError(f"tuning state lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, tensor in current.items():
                tensor.copy_(state[name].to(tensor.device, tensor.dtype))

    def local_optimizer_state(self) -> dict[str, torch.Tensor]:
        """Optimizer moments, STE shadows and V-step residuals this rank holds (owned layers only)."""
        state = self.p_opt.state_tensors("p::") if self.dist.is_main else {}
        state.update(self.v_opt.state_tensors("v::"))
        state.update({f"shadow::{name}": t for name, t in self.shadows.items()})
        state.update({f"residual::{name}": t for name, t in self.residuals.items()})
        state.update(self.inputs.state_tensors(set(self.owned_layers())))
        return state

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        owned = set(self.owned_layers())
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        self.p_opt.load_state_tensors(tensors, "p::")
        self.v_opt.load_state_tensors({k: v for k, v in tensors.items()
                                       if k.startswith("v::") and k[3:].rsplit("::", 1)[0] in owned}, "v::")
        for name in owned:
            if f"shadow::{name}" in tensors:
                self.shadows[name] = tensors[f"shadow::{name}"].float().clone()
            if f"residual::{name}" in tensors:
                self.residuals[name] = tensors[f"residual::{name}"].float().clone()
        self.inputs.load_state_tensors(tensors, owned)
