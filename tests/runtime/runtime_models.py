"""Tiny random Llama-family models for the runtime tests (built here, nothing downloaded)."""

from __future__ import annotations

import torch

LLAMA_VARIANTS = {
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-bias-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                            attention_bias=True, mlp_bias=True),
    "mqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64}),
}


def make_llama(variant: str = "gqa-tied", seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, vocab_size=256,
                         max_position_embeddings=256, **LLAMA_VARIANTS[variant])
    model = LlamaForCausalLM(config).eval()
    _spread_norms(model)
    return model.to(dtype)


def _spread_norms(model) -> None:
    """Random (not all-ones) norm weights, so a wrong norm cannot hide."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()
