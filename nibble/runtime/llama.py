"""A lean decode step for Llama-family models, written over the model's own weights.

Per layer: RMSNorm, one fused QKV matmul, RoPE on q and k together, an in-place write into the
static KV cache, grouped-query attention over the cached prefix, the output projection, RMSNorm,
one fused gate/up matmul, SiLU-gate and the down projection. Quantized linears are called through
``nibble.runtime.linears`` and never fused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nibble.errors import UnsupportedArchitectureError
from nibble.runtime.engine import StepInput, padded_attention
from nibble.runtime.kv_cache import StaticKVCache
from nibble.runtime.linears import PreparedLinear, prepare_group, prepare_linear

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


@dataclass
class LlamaLayer:
    """The tensors and linears of one decoder block."""

    input_norm: torch.Tensor
    qkv: list[PreparedLinear]
    o_proj: PreparedLinear
    post_norm: torch.Tensor
    gate_up: list[PreparedLinear]
    down: PreparedLinear


@dataclass(frozen=True)
class LlamaShape:
    """The sizes a decode step needs."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eps: float
    scale: float


def check_llama_config(config, max_len: int) -> None:
    """Raise ``UnsupportedArchitectureError`` for Llama-family variants this runtime does not implement."""
    if config.model_type not in LLAMA_FAMILY:
        raise UnsupportedArchitectureError(f"{config.model_type} is not a Llama-family model")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"activation {config.hidden_act} is not supported (only silu)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):
        raise UnsupportedArchitectureError(f"rope_type {rope['rope_type']} is not supported")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", config.model_type == "mistral")
    if uses_window and window is not None and window < max_len:
        raise UnsupportedArchitectureError(
            f"sliding-window attention ({window} tokens) is not supported; use max_len <= {window}"
        )


def llama_shape(model: nn.Module) -> LlamaShape:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = model.model.layers[0].self_attn
    return LlamaShape(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        eps=float(model.model.norm.variance_epsilon),
        scale=float(getattr(attention, "scaling", head_dim ** -0.5)),
    )


def rope_tables(model: nn.Module, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, signed_sin)`` of shape [max_len, head_dim], from the model's own rotary module.

    ``signed_sin`` has its first half negated, so ``rotate_half(x) * sin == x.roll(d/2) * signed_sin``.
    """
    rotary = model.model.rotary_emb
    device = rotary.inv_freq.device
    positions = torch.arange(max_len, device=device)[None]
    probe = torch.zeros(1, dtype=dtype, device=device)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    cos, sin = cos[0].to(dtype), sin[0].to(dtype)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return cos.contiguous(), signed_sin.contiguous()


def extract_layers(model: nn.Module, fuse: bool = True) -> list[LlamaLayer]:
    """Every decoder block as a ``LlamaLayer`` (fusing QKV and gate/up when they are plain linears)."""
    layers = []
    for block in model.model.layers:
        attention, mlp = block.self_attn, block.mlp
        layers.append(LlamaLayer(
            input_norm=block.input_layernorm.weight.detach(),
            qkv=prepare_group([attention.q_proj, attention.k_proj, attention.v_proj], fuse),
            o_proj=prepare_linear(attention.o_proj),
            post_norm=block.post_attention_layernorm.weight.detach(),
            gate_up=prepare_group([mlp.gate_proj, mlp.up_proj], fuse),
            down=prepare_linear(mlp.down_proj),
        ))
    return layers


class LlamaTorchStep:
    """The decode/prefill step in eager torch: works on any device and with any linear module."""

    def __init__(self, model: nn.Module, max_len: int, fuse: bool = True):
        check_llama_config(model.config, max_len)
        self.shape = llama_shape(model)
        self.layers = extract_layers(model, fuse)
        self.embed = model.model.embed_tokens
        self.final_norm = model.model.norm.weight.detach()
        self.lm_head = prepare_linear(model.lm_head)
        dtype = self.final_norm.dtype
        self.cos, self.sin = rope_tables(model, max_len, dtype)

    def __call__(self, batch: StepInput, cache: StaticKVCache, all_logits: bool = False) -> torch.Tensor:
        """Logits ``[batch, vocab]`` at the last position (``[batch, T, vocab]`` with ``all_logits``)."""
        shape = self.shape
        start, mask, causal = batch.start, batch.mask, batch.causal
        end = start + batch.tokens.shape[1]

        def attend(query, key, value, keys, values):
            keys[:, :, start:end].copy_(key.transpose(1, 2))
            values[:, :, start:end].copy_(value.transpose(1, 2))
            if end - start == 1 and mask is None:
                return decode_attention(query, keys[:, :, :end], values[:, :, :end], shape.scale)
            return F.scaled_dot_product_attention(query.transpose(1, 2), keys[:, :, :end], values[:, :, :end],
                                                  attn_mask=mask, is_causal=causal, scale=shape.scale,
                                                  enable_gqa=True).transpose(1, 2)

        x = self._layers(self.embed(batch.tokens), batch.positions, cache, attend)
        return self._logits(x if all_logits else x[:, -1])

    def decode_masked(self, tokens: torch.Tensor, slot: torch.Tensor, pads: torch.Tensor, length: int,
                      cache: StaticKVCache) -> torch.Tensor:
        """Logits ``[batch, vocab]`` of ``tokens`` [batch, 1] written at cache slot ``slot`` (a [1] tensor).

        Row r attends to slots ``pads[r] .. slot`` among the first ``length`` (the others masked) at
        RoPE position ``slot - pads[r]``. Shapes depend on ``length`` only and nothing is read back
        to the host, so one CUDA graph captured with these tensors replays for every ``slot < length``.
        """
        shape = self.shape
        positions, visible = padded_attention(slot, pads, length)

        def attend(query, key, value, keys, values):
            keys.index_copy_(2, slot, key.transpose(1, 2))
            values.index_copy_(2, slot, value.transpose(1, 2))
            return decode_attention(query, keys[:, :, :length], values[:, :, :length], shape.scale, visible)

        return self._logits(self._layers(self.embed(tokens), positions, cache, attend)[:, -1])

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache, attend) -> torch.Tensor:
        """Every decoder block over ``x`` [batch, T, hidden]; ``attend(query, key, value, keys, values)``
        stores the new keys/values in the layer's cache views and returns the attention output."""
        shape = self.shape
        cos = self.cos[positions].unsqueeze(2)
        sin = self.sin[positions].unsqueeze(2)
        batch, steps, _ = x.shape
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (shape.hidden,), layer.input_norm, shape.eps)
            out = attend(*self._rotated_qkv(h, layer, cos, sin), *cache.layer(index))
            x = x + layer.o_proj(out.reshape(batch, steps, shape.num_heads * shape.head_dim))
            h = F.rms_norm(x, (shape.hidden,), layer.post_norm, shape.eps)
            x = x + layer.down(self._gated(h, layer))
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(F.rms_norm(x, (self.shape.hidden,), self.final_norm, self.shape.eps))

    def _rotated_qkv(self, h: torch.Tensor, layer: LlamaLayer, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, key, value), each [batch, T, heads, head_dim], query and key rotated (RoPE)."""
        shape = self.shape
        batch, steps, _ = h.shape
        heads = shape.num_heads + 2 * shape.num_kv_heads
        qkv = torch.cat([linear(h) for linear in layer.qkv], dim=-1) if len(layer.qkv) > 1 else layer.qkv[0](h)
        qkv = qkv.view(batch, steps, heads, shape.head_dim)
        rotated = shape.num_heads + shape.num_kv_heads
        qk = qkv[:, :, :rotated]
        qk = torch.addcmul(qk * cos, qk.roll(shape.head_dim // 2, -1), sin)
        return qk[:, :, :shape.num_heads], qk[:, :, shape.num_heads:], qkv[:, :, rotated:]

    @staticmethod
    def _gated(h: torch.Tensor, layer: LlamaLayer) -> torch.Tensor:
        if len(layer.gate_up) == 1:
            gate, up = layer.gate_up[0](h).chunk(2, dim=-1)
        else:
            gate, up = layer.gate_up[0](h), layer.gate_up[1](h)
        return F.silu(gate).mul_(up)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                     visible: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per row over the cached keys, grouped-query, without repeating kv.

    ``query`` [batch, 1, heads, head_dim]; ``keys``/``values`` [batch, kv_heads, length, head_dim];
    ``visible`` (optional) bool [batch, 1, 1, length]: the keys each row may attend to.
    Query head ``h`` reads kv head ``h // (heads / kv_heads)``, as transformers' ``repeat_kv`` does.
    """
    batch, _, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), values).reshape(batch, 1, heads, head_dim)
