"""Quantizing the output head for decoding (``nibble.runtime.head``)."""

from __future__ import annotations

import pytest
import torch
from runtime.runtime_models import hf_logits, make_llama

from nibble.formats.scalar import ScalarQuantLinear
from nibble.runtime import build_runtime, native
from nibble.runtime.head import quantize_head


HEADS = [(8, -1, 0.02), (4, 32, 0.1)]  # bits, group size, bound on the logits' change / max |logit|


@pytest.mark.parametrize("bits,group_size,tolerance", HEADS)
@pytest.mark.parametrize("variant", ["gqa-tied", "mha-bias-untied"])
def test_quantized_head_stays_close_to_the_float_head(variant, bits, group_size, tolerance):
    model = make_llama(variant)
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    before = hf_logits(model, tokens)
    embedding = model.model.embed_tokens.weight.detach().clone()
    quantize_head(model, bits, group_size)
    assert isinstance(model.lm_head, ScalarQuantLinear) and model.lm_head.bits == bits
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding, rtol=0, atol=0)  # untouched
    after = hf_logits(model, tokens)
    assert 0 < (after - before).abs().max() < tolerance * before.abs().max()


@pytest.mark.skipif(not native.available(), reason="no C++ compiler for the decode runtime")
@pytest.mark.parametrize("bits,group_size", [(8, -1), (4, 32)])
def test_cpp_decode_step_reads_the_quantized_head_like_the_model(bits, group_size):
    model = quantize_head(make_llama(), bits, group_size)
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    reference = hf_logits(model, tokens)
    runtime = build_runtime(model, max_len=8, backend="cpp")
    assert runtime.backend == "cpp" and runtime.step.torch_step.lm_head.ckernel is not None
    runtime.start()
    runtime.feed(tokens[:, :5])
    torch.testing.assert_close(runtime.feed(tokens[:, 5]), reference[:, 5], atol=1e-4, rtol=0)


def test_errors_name_the_problem():
    model = quantize_head(make_llama())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_head(model)
    with pytest.raises(ValueError, match="head bits"):
        quantize_head(make_llama(), bits=3)
