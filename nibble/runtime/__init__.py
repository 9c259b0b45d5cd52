"""Lean decoding of (quantized) causal LMs: static KV cache, fused C++ decode step, sampling.

>>> runtime = build_runtime(model, max_len=512)          # backend "auto": C++ on CPU when it builds
>>> result = generate(runtime, [prompt_ids], max_new_tokens=64)
>>> result.tokens[0], result.tokens_per_s
"""

from nibble.runtime.chat import ChatSession, default_stop_tokens
from nibble.runtime.engine import BACKENDS, SUPPORTED, DecodeRuntime, build_runtime
from nibble.runtime.generate import GenerationResult, generate
from nibble.runtime.kv_cache import KVCacheFullError, StaticKVCache
from nibble.runtime.sampling import Sampler, SamplingConfig
from nibble.runtime.stream import TextStream

__all__ = [
    "BACKENDS",
    "SUPPORTED",
    "ChatSession",
    "DecodeRuntime",
    "GenerationResult",
    "KVCacheFullError",
    "Sampler",
    "SamplingConfig",
    "StaticKVCache",
    "TextStream",
    "build_runtime",
    "default_stop_tokens",
    "generate",
]
