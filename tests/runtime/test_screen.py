"""Greedy decoding through the 8-bit screen of a float head picks exactly the float head's argmax."""

from __future__ import annotations

import pytest
import torch
from runtime.runtime_models import make_llama

from nibble.runtime import build_runtime, generate
from nibble.runtime.sampling import Sampler, SamplingConfig
from nibble.runtime.screen import screen_tensors

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]


def near_tie_model(seed: int = 0):
    """A tiny untied Llama whose head rows come in pairs: equal (odd pairs) or 1 ulp apart (even
    pairs), so almost every argmax is a near tie the screen has to settle exactly."""
    model = make_llama("mha-bias-untied", seed=seed)
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[1::2] = weight[0::2]
        weight[2::4] = torch.nextafter(weight[2::4], torch.full_like(weight[2::4], float("inf")))
    return model


def greedy_tokens(model, backend: str, screen: bool = True, max_candidates: int | None = None,
                  threads: int = 2) -> list[list[int]]:
    runtime = build_runtime(model, max_len=96, batch_size=len(PROMPTS), backend=backend, threads=threads)
    if backend == "cpp":
        if not screen:
            runtime.step.screen = None
        elif max_candidates is not None:
            runtime.step.screen.max_candidates = max_candidates
    return generate(runtime, PROMPTS, 60).tokens


@pytest.mark.parametrize("threads", [1, 2])
def test_screened_greedy_equals_full_float_head_on_near_ties(threads: int):
    model = near_tie_model()
    full = greedy_tokens(model, "cpp", screen=False, threads=threads)
    assert greedy_tokens(model, "cpp", threads=threads) == full
    assert greedy_tokens(model, "cpp", max_candidates=0, threads=threads) == full  # every row falls back


def test_screened_greedy_matches_the_torch_step():
    model = make_llama("gqa-tied", seed=3)
    assert greedy_tokens(model, "cpp") == greedy_tokens(model, "torch")


def test_screen_bounds_hold_and_screen_decides():
    model = make_llama("gqa-tied", seed=1)
    runtime = build_runtime(model, max_len=32, batch_size=1, threads=1)
    runtime.start()
    prompt = torch.tensor([[5, 9, 12, 40]])
    runtime.feed(prompt[:, :3])
    full_logits = runtime.feed(prompt[:, 3]).clone()  # float head, through nb_llama_decode
    runtime.rewind(3)
    pick = runtime.next_tokens([40], Sampler(SamplingConfig()))
    assert pick == full_logits.argmax(-1).tolist()
    # the step left the 8-bit head's logits (the screen decided): within the bound of the float ones
    approx = runtime.step.scratch["logits"]
    head = runtime.step.torch_step.lm_head
    _, bounds = screen_tensors(head.weight, head.bias)
    h = runtime.step.scratch["h"][0]
    eps = bounds["weight_error"] * h.abs().sum() + bounds["code_sum"] * h.abs().max() / 16382
    difference = (approx[0] - full_logits[0]).abs()
    assert difference.max() > 0
    assert bool((difference <= eps).all())


def test_sampling_and_rounded_heads_skip_the_screen():
    from nibble.runtime.head import quantize_head

    model = quantize_head(make_llama("gqa-tied", seed=2), 8)
    runtime = build_runtime(model, max_len=32, batch_size=1)
    assert runtime.step.screen is None  # the head is already 8-bit: nothing to screen
    sampled = generate(build_runtime(make_llama("gqa-tied", seed=2), max_len=32), [[3, 4]], 10,
                       SamplingConfig(temperature=0.8, seed=0))
    eager = generate(build_runtime(make_llama("gqa-tied", seed=2), max_len=32, backend="torch"), [[3, 4]], 10,
                     SamplingConfig(temperature=0.8, seed=0))
    assert sampled.tokens == eager.tokens
