"""The Llama decode step through the C++ library: one foreign call per generated token.

Prefill (several tokens per row) runs through ``LlamaTorchStep``: it is one call per prompt, so its
Python overhead is spread over many tokens. Both write the same ``StaticKVCache``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from ctypes import POINTER, c_double, c_int64, c_void_p

import torch
from torch import nn

from nibble.runtime.engine import StepInput
from nibble.runtime.kv_cache import StaticKVCache
from nibble.runtime.linears import PreparedLinear, prepare_linear
from nibble.runtime.llama import LlamaTorchStep
from nibble.runtime.native import NativeUnavailable, load_library
from nibble.runtime.sampling import Sampler
from nibble.runtime.screen import max_candidates, screen_tensors

COMPUTE_FN = ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_int64, c_void_p, c_void_p, c_int64, c_int64, c_int64,
                              c_int64)


class NbLinear(ctypes.Structure):
    _fields_ = [("in_features", c_int64), ("out_features", c_int64), ("weight", c_void_p), ("bias", c_void_p),
                ("prepare", c_void_p), ("compute", c_void_p), ("ctx", c_void_p), ("workspace", c_void_p),
                ("chunk", c_int64), ("prepare_parts", c_int64), ("split", c_void_p), ("split_parts", c_int64),
                ("partials", c_void_p)]


class NbLayer(ctypes.Structure):
    _fields_ = [("input_norm", c_void_p), ("post_norm", c_void_p), ("qkv", NbLinear * 3), ("n_qkv", c_int64),
                ("o_proj", NbLinear), ("gate_up", NbLinear * 2), ("n_gate_up", c_int64), ("down", NbLinear)]


class NbModel(ctypes.Structure):
    _fields_ = [(name, c_int64) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                              "intermediate", "vocab", "max_len", "batch", "threads")]
    _fields_ += [("eps", c_double), ("scale", c_double)]
    _fields_ += [(name, c_void_p) for name in ("embed", "final_norm", "rope_cos", "rope_sin", "cache")]
    _fields_ += [("layers", POINTER(NbLayer)), ("lm_head", NbLinear)]
    _fields_ += [(name, c_void_p) for name in ("x", "h", "qkv", "attn", "mlp", "scores", "logits")]


class NbScreen(ctypes.Structure):
    _fields_ = [("approx", NbLinear), ("weight_error", c_void_p), ("code_sum", c_void_p), ("magnitude", c_void_p),
                ("max_candidates", c_int64), ("candidates", c_void_p)]


class LlamaNativeStep:
    """Same contract as ``LlamaTorchStep``; single-token calls on float32 CPU models go to C++."""

    def __init__(self, model: nn.Module, max_len: int, cache: StaticKVCache, fuse: bool = True,
                 threads: int | None = None, screen_head: bool = True):
        _check_native_inputs(cache)
        self.library = _declare(load_library())
        self.torch_step = LlamaTorchStep(model, max_len, fuse)
        self.cache = cache
        self.keep: list = []  # tensors and callbacks the C side points into
        self.error: BaseException | None = None
        self.scratch = self._allocate(model, max_len, cache.batch_size)
        self.struct = self._describe(model, max_len, cache)
        self.struct.threads = threads or torch.get_num_threads()
        self.screen = self._screen() if screen_head else None
        batch = cache.batch_size
        self.token_slots = (c_int64 * batch).from_address(self.scratch["tokens"].data_ptr())
        self.pick_slots = (c_int64 * batch).from_address(self.scratch["picks"].data_ptr())

    def __call__(self, batch: StepInput, cache: StaticKVCache, all_logits: bool = False) -> torch.Tensor:
        if batch.tokens.shape[1] != 1 or all_logits or cache is not self.cache:
            return self.torch_step(batch, cache, all_logits)
        self._decode(batch.tokens[:, 0], batch.positions[:, 0], batch.pad_lengths, batch.start)
        return self.scratch["logits"].clone()

    def decode_token(self, tokens: Sequence[int], start: int, pad_lengths: torch.Tensor,
                     sampler: Sampler) -> list[int]:
        """The next token of each row after ``tokens`` (one per row, written to cache slot ``start``).

        The lean path of a generation loop, with no torch op when ``sampler`` is greedy (and the
        embedding a plain float table): after a step has streamed the weights through the caches,
        each torch call costs tens of microseconds.
        Tokens go in and out through fixed buffers, positions are derived from ``pad_lengths`` in C,
        and the pick is made in C from the logits buffer (a sampler reads that buffer in place).
        """
        if len(tokens) != self.struct.batch:
            raise ValueError(f"{len(tokens)} tokens for a batch of {self.struct.batch}")
        self.token_slots[:] = tokens
        if not self.embed_native:
            self.scratch["x"].copy_(self.torch_step.embed(self.scratch["tokens"]))
        tokens_address = self.scratch["tokens"].data_ptr() if self.embed_native else None
        picks = self.scratch["picks"]
        if sampler.config.greedy and self.screen is not None:
            self._run(tokens_address, None, pad_lengths, start, picks)
            return self.pick_slots[:]
        self._run(tokens_address, None, pad_lengths, start)
        logits = self.scratch["logits"]
        if not sampler.config.greedy:
            return sampler(logits).tolist()
        self.library.nb_argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], picks.data_ptr())
        return self.pick_slots[:]

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, pad_lengths: torch.Tensor, slot: int) -> None:
        """Run the C++ step for one token per row; the logits land in ``scratch["logits"]``."""
        tokens, positions = tokens.to(torch.long).contiguous(), positions.contiguous()  # alive for the call
        if not self.embed_native:
            self.scratch["x"].copy_(self.torch_step.embed(tokens))
        self._run(tokens.data_ptr() if self.embed_native else None, positions.data_ptr(), pad_lengths, slot)

    def _run(self, tokens: int | None, positions: int | None, pad_lengths: torch.Tensor, slot: int,
             picks: torch.Tensor | None = None) -> None:
        """The C++ step on token and position addresses (positions None: derived from the pads); with
        ``picks``, the greedy step through the screened head, writing each row's pick there."""
        pads = pad_lengths.contiguous()
        if picks is None:
            status = self.library.nb_llama_decode(ctypes.byref(self.struct), tokens, positions, pads.data_ptr(), slot)
        else:
            status = self.library.nb_llama_decode_greedy(ctypes.byref(self.struct), ctypes.byref(self.screen), tokens,
                                                         positions, pads.data_ptr(), slot, picks.data_ptr())
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if status != 0:
            raise RuntimeError(f"C++ decode step failed with status {status}")

    def _allocate(self, model: nn.Module, max_len: int, batch: int) -> dict[str, torch.Tensor]:
        s = self.torch_step.shape
        widths = {"x": s.hidden, "h": s.hidden, "qkv": (s.num_heads + 2 * s.num_kv_heads) * s.head_dim,
                  "attn": s.num_heads * s.head_dim, "mlp": 2 * model.config.intermediate_size,
                  "scores": s.num_heads * max_len, "logits": self.torch_step.lm_head.out_features}
        buffers = {name: torch.zeros(batch, width, dtype=torch.float32) for name, width in widths.items()}
        return buffers | {name: torch.zeros(batch, dtype=torch.long) for name in ("tokens", "picks")}

    def _describe(self, model: nn.Module, max_len: int, cache: StaticKVCache) -> NbModel:
        s, step, scratch = self.torch_step.shape, self.torch_step, self.scratch
        embed = step.embed
        self.embed_native = type(embed) is nn.Embedding and embed.weight.dtype == torch.float32
        layers = (NbLayer * s.num_layers)(*[self._layer(layer) for layer in step.layers])
        self.keep.append(layers)
        struct = NbModel(
            num_layers=s.num_layers, hidden=s.hidden, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim, intermediate=model.config.intermediate_size,
            vocab=step.lm_head.out_features, max_len=max_len, batch=cache.batch_size,
            threads=1, eps=s.eps, scale=s.scale,
            embed=self._ptr(embed.weight) if self.embed_native else None, final_norm=self._ptr(step.final_norm),
            rope_cos=self._ptr(step.cos), rope_sin=self._ptr(step.sin), cache=cache.data.data_ptr(),
            layers=ctypes.cast(layers, POINTER(NbLayer)),
            lm_head=self._linear(step.lm_head, scratch["h"], scratch["logits"]),
        )
        for name, tensor in scratch.items():
            if tensor.dtype == torch.float32:
                setattr(struct, name, tensor.data_ptr())
        return struct

    def _screen(self) -> NbScreen | None:
        """The 8-bit screen of a float head (see ``nibble.runtime.screen``), or None for other heads."""
        head = self.torch_step.lm_head
        if not head.is_dense or head.weight.dtype != torch.float32:
            return None
        rounded, bounds = screen_tensors(head.weight, head.bias)
        candidates = torch.zeros(max_candidates(head.out_features), dtype=torch.long)
        self.keep += [rounded, candidates, *bounds.values()]
        approx = self._linear(prepare_linear(rounded), self.scratch["h"], self.scratch["logits"])
        return NbScreen(approx, *(bounds[name].data_ptr() for name in ("weight_error", "code_sum", "magnitude")),
                        candidates.numel(), candidates.data_ptr())

    def _layer(self, layer) -> NbLayer:
        scratch = self.scratch
        intermediate = scratch["mlp"].shape[1] // 2
        return NbLayer(
            input_norm=self._ptr(layer.input_norm), post_norm=self._ptr(layer.post_norm),
            qkv=(NbLinear * 3)(*self._group(layer.qkv, scratch["qkv"])), n_qkv=len(layer.qkv),
            o_proj=self._linear(layer.o_proj, scratch["attn"], scratch["h"]),
            gate_up=(NbLinear * 2)(*self._group(layer.gate_up, scratch["mlp"])), n_gate_up=len(layer.gate_up),
            down=self._linear(layer.down, scratch["mlp"][:, :intermediate], scratch["h"]),
        )

    def _group(self, linears: list[PreparedLinear], out: torch.Tensor) -> list[NbLinear]:
        structs, offset = [], 0
        for linear in linears:
            structs.append(self._linear(linear, self.scratch["h"], out[:, offset:offset + linear.out_features]))
            offset += linear.out_features
        return structs

    def _linear(self, linear: PreparedLinear, x: torch.Tensor, y: torch.Tensor) -> NbLinear:
        """The C description of ``linear`` reading scratch view ``x`` and writing view ``y``."""
        if linear.is_dense:
            weight = linear.weight.contiguous()
            bias = None if linear.bias is None else self._ptr(linear.bias.contiguous())
            return NbLinear(weight.shape[1], weight.shape[0], self._ptr(weight), bias)
        if linear.ckernel is not None:
            kernel = linear.ckernel
            workspace = torch.zeros(max(1, kernel.workspace_per_row * x.shape[0]), dtype=torch.float32)
            partials = torch.zeros(kernel.split_parts * x.shape[0] * linear.out_features if kernel.split else 1)
            self.keep += [kernel.keep_alive, workspace, partials]
            return NbLinear(x.shape[1], linear.out_features, None, None, kernel.prepare, kernel.compute,
                            kernel.context, workspace.data_ptr(), kernel.chunk, kernel.prepare_parts,
                            kernel.split, kernel.split_parts, partials.data_ptr())
        callback = COMPUTE_FN(self._python_linear(linear, x, y))
        self.keep.append(callback)
        address = ctypes.cast(callback, c_void_p).value
        return NbLinear(x.shape[1], linear.out_features, None, None, None, address, None, None,
                        linear.out_features, 1)  # one chunk: runs on the calling thread, under the GIL

    def _python_linear(self, linear: PreparedLinear, x: torch.Tensor, y: torch.Tensor):
        def call(_ctx, _x, _x_stride, _workspace, _y, _y_stride, _rows, _begin, _end) -> None:
            try:
                with torch.inference_mode():
                    y.copy_(linear(x))
            except BaseException as exc:  # surfaced after the foreign call returns
                self.error = self.error or exc
        return call

    def _ptr(self, tensor: torch.Tensor) -> int:
        if tensor.dtype != torch.float32 or not tensor.is_contiguous():
            tensor = tensor.float().contiguous()
        self.keep.append(tensor)
        return tensor.data_ptr()


def _check_native_inputs(cache: StaticKVCache) -> None:
    if cache.data.device.type != "cpu" or cache.data.dtype != torch.float32:
        raise NativeUnavailable("the C++ decode step runs float32 models on the CPU only")


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    library.nb_llama_decode.argtypes = [POINTER(NbModel), c_void_p, c_void_p, c_void_p, c_int64]
    library.nb_llama_decode.restype = c_int64
    library.nb_llama_decode_greedy.argtypes = [POINTER(NbModel), POINTER(NbScreen), c_void_p, c_void_p, c_void_p,
                                               c_int64, c_void_p]
    library.nb_llama_decode_greedy.restype = c_int64
    library.nb_argmax_rows.argtypes = [c_void_p, c_int64, c_int64, c_void_p]
    library.nb_argmax_rows.restype = None
    return library
