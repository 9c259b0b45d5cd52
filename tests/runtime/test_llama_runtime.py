"""The decode runtime gives transformers' logits, for both backends, across configs and batch shapes."""

from __future__ import annotations

import pytest
import torch
from runtime.runtime_models import LLAMA_VARIANTS, hf_logits, make_llama

from nibble.runtime import build_runtime

BACKENDS = ("torch", "cpp")
FP32_TOL = 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_prefill_and_decode_match_transformers(variant: str, backend: str):
    model = make_llama(variant)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(model, tokens)
    runtime = build_runtime(model, max_len=32, backend=backend)
    assert runtime.backend == backend
    runtime.start()
    prefill = runtime.feed(tokens[:, :5], all_logits=True)
    torch.testing.assert_close(prefill, reference[:, :5], atol=FP32_TOL, rtol=0)
    for t in range(5, 12):
        torch.testing.assert_close(runtime.feed(tokens[:, t]), reference[:, t], atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_continues_the_cache(backend: str):
    model = make_llama()
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    reference = hf_logits(model, tokens)
    runtime = build_runtime(model, max_len=16, batch_size=2, backend=backend)
    runtime.start()
    runtime.feed(tokens[:, :4])
    chunk = runtime.feed(tokens[:, 4:9], all_logits=True)
    torch.testing.assert_close(chunk, reference[:, 4:9], atol=FP32_TOL, rtol=0)
    torch.testing.assert_close(runtime.feed(tokens[:, 9]), reference[:, 9], atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [(7,), (7, 7), (3, 9, 6)])
def test_left_padded_batches_match_each_row_alone(backend: str, lengths: tuple[int, ...]):
    model = make_llama()
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 256, (n + 3,), generator=generator) for n in lengths]
    longest = max(lengths)
    runtime = build_runtime(model, max_len=longest + 3, batch_size=len(lengths), backend=backend)
    runtime.start([longest - n for n in lengths])
    prompt = torch.stack([torch.cat([torch.zeros(longest - n, dtype=torch.long), row[:n]])
                          for n, row in zip(lengths, rows)])
    outputs = [runtime.feed(prompt)]
    for step in range(3):
        outputs.append(runtime.feed(torch.stack([row[n + step] for n, row in zip(lengths, rows)])))
    for index, (n, row) in enumerate(zip(lengths, rows)):
        reference = hf_logits(model, row[None])[0]
        for step, logits in enumerate(outputs):
            torch.testing.assert_close(logits[index], reference[n - 1 + step], atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.15), (torch.float16, 0.02)])
def test_half_precision_torch_backend(dtype: torch.dtype, tol: float):
    model = make_llama(dtype=dtype)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    reference = hf_logits(model, tokens)
    runtime = build_runtime(model, max_len=16, batch_size=2, backend="auto")
    assert runtime.backend == "torch"  # the C++ step is float32 only
    runtime.start()
    torch.testing.assert_close(runtime.feed(tokens[:, :6]).float(), reference[:, 5], atol=tol, rtol=0)
    for t in range(6, 9):
        torch.testing.assert_close(runtime.feed(tokens[:, t]).float(), reference[:, t], atol=tol, rtol=0)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_llama_family_models(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=256, sliding_window=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    reference = hf_logits(model, tokens)
    for backend in BACKENDS:
        runtime = build_runtime(model, max_len=16, backend=backend)
        runtime.start()
        runtime.feed(tokens[:, :7])
        torch.testing.assert_close(runtime.feed(tokens[:, 7]), reference[:, 7], atol=FP32_TOL, rtol=0)
