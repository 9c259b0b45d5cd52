"""LM task: byte tokenizer, the transformer, perplexity, and a few steps on the shared data."""

import math

import pytest
import torch

from nibble.errors import DatasetError
from nibble.train.tasks.lm import LMConfig, TinyLM, decode_bytes, encode_bytes, perplexity, run_lm, windows


def test_byte_tokenizer_round_trip():
    text = "Zürich — 4-bit ✓"
    ids = encode_bytes(text)
    assert ids.numel() == len(text.encode()) and ids.max() < 256
    assert decode_bytes(ids) == text
    with pytest.raises(DatasetError):
        encode_bytes("")


def test_windows_drop_the_tail():
    assert windows(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(DatasetError):
        windows(torch.arange(2), 3)


def test_model_is_causal():
    model = TinyLM(dim=32, layers=2, heads=4, context=16).eval()
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(ids)[:, :8], model(changed)[:, :8], atol=1e-6)
        assert not torch.allclose(model(ids)[:, 8], model(changed)[:, 8])


def test_uniform_model_has_perplexity_256():
    model = TinyLM(dim=16, layers=1, heads=2, context=8)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    assert perplexity(model, torch.randint(0, 256, (100,)), context=8) == pytest.approx(256, rel=1e-5)


def test_few_steps_on_the_shared_data(shared_data):
    config = LMConfig(dim=32, layers=1, heads=2, context=32, batch_size=8, max_steps=6, eval_bytes=3000)
    result = run_lm("nvfp4", 0, config, progress=False)
    assert result["steps"] == 6 and result["task"] == "lm"
    assert 1 < result["ppl"] < 256 * 2 and math.isfinite(result["loss"])
    assert len(result["quantized_layers"]) == 4


def test_inspect_sees_every_step_without_changing_training(shared_data):
    config = LMConfig(dim=32, layers=1, heads=2, context=32, batch_size=8, max_steps=4, eval_bytes=3000)
    seen = []
    inspected = run_lm("ibm-fp4-sr", 0, config, progress=False,
                       inspect=lambda model, step, inputs, targets: seen.append((step, inputs.shape)))
    plain = run_lm("ibm-fp4-sr", 0, config, progress=False)
    assert seen == [(step, torch.Size([8, 32])) for step in range(4)]
    assert inspected["ppl"] == plain["ppl"]
