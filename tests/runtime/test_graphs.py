"""The CUDA-graph decode step: its static-shape computation matches transformers (checked eagerly on
any device), length buckets, and errors; the captured graphs themselves only where CUDA exists."""

from __future__ import annotations

import pytest
import torch
from runtime.runtime_models import LLAMA_VARIANTS, hf_logits, make_llama

from nibble.errors import ConfigError
from nibble.runtime import DecodeRuntime, StaticKVCache, build_runtime, generate
from nibble.runtime.graphs import GraphedDecodeStep, length_bucket
from nibble.runtime.llama import LlamaTorchStep, llama_shape

FP32_TOL = 1e-4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class RecordingSampler:
    """Greedy picks, keeping every logits tensor it was shown."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.seen.append(logits.float().cpu().clone())
        return logits.argmax(-1)


def static_runtime(model, max_len: int, batch_size: int, capture: bool = False) -> DecodeRuntime:
    shape = llama_shape(model)
    device = next(model.parameters()).device
    cache = StaticKVCache(shape.num_layers, batch_size, shape.num_kv_heads, max_len, shape.head_dim, device=device)
    return DecodeRuntime(GraphedDecodeStep(LlamaTorchStep(model, max_len), cache, capture), cache, "graph")


def teacher_forced_logits(runtime: DecodeRuntime, rows: list[torch.Tensor], lengths: tuple[int, ...],
                          steps: int) -> list[torch.Tensor]:
    """Logits after each row's prompt (its first n tokens), then after each of its next ``steps`` tokens."""
    longest = max(lengths)
    runtime.start([longest - n for n in lengths])
    prompt = torch.stack([torch.cat([torch.zeros(longest - n, dtype=torch.long), row[:n]])
                          for n, row in zip(lengths, rows)])
    sampler = RecordingSampler()
    sampler(runtime.feed(prompt.to(runtime.device)))
    for step in range(steps):
        runtime.next_tokens([int(row[n + step]) for n, row in zip(lengths, rows)], sampler)
    return sampler.seen


def check_against_transformers(model, runtime, lengths: tuple[int, ...], steps: int, tol: float) -> None:
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 256, (n + steps,), generator=generator) for n in lengths]
    outputs = teacher_forced_logits(runtime, rows, lengths, steps)
    for index, (n, row) in enumerate(zip(lengths, rows)):
        reference = hf_logits(model, row[None].to(runtime.device))[0].cpu()
        for step, logits in enumerate(outputs):
            torch.testing.assert_close(logits[index], reference[n - 1 + step], atol=tol, rtol=0)


@pytest.mark.parametrize("slot,max_len,bucket", [(0, 2048, 64), (63, 2048, 64), (64, 2048, 128),
                                                 (1000, 2048, 1024), (1024, 2048, 2048), (40, 48, 48)])
def test_length_bucket(slot: int, max_len: int, bucket: int):
    assert length_bucket(slot, max_len) == bucket


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
@pytest.mark.parametrize("lengths", [(5,), (3, 9, 6)])
def test_static_step_matches_transformers(variant: str, lengths: tuple[int, ...]):
    model = make_llama(variant)
    runtime = static_runtime(model, max_len=max(lengths) + 4, batch_size=len(lengths))
    check_against_transformers(model, runtime, lengths, steps=4, tol=FP32_TOL)


def test_static_step_across_a_length_bucket():
    # decode slots 60..69 attend to 64 slots, then to 128
    model = make_llama()
    runtime = static_runtime(model, max_len=200, batch_size=2)
    check_against_transformers(model, runtime, (60, 57), steps=10, tol=FP32_TOL)


def test_graph_backend_needs_cuda():
    model = make_llama()
    with pytest.raises(ConfigError, match="CUDA graphs"):
        build_runtime(model, max_len=16, backend="graph")
    cache = StaticKVCache(2, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedDecodeStep(LlamaTorchStep(model, 16), cache, capture=True)


@cuda
def test_auto_backend_on_gpu_replays_graphs_matching_transformers():
    model = make_llama().cuda()
    runtime = build_runtime(model, max_len=200, batch_size=2)
    assert runtime.backend == "graph"
    check_against_transformers(model, runtime, (60, 57), steps=10, tol=FP32_TOL)
    assert set(runtime.step.graphs) == {64, 128}


@cuda
def test_graph_generation_equals_eager_generation():
    model = make_llama(dtype=torch.float16).cuda()
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    results = {backend: generate(build_runtime(model, max_len=128, batch_size=2, backend=backend), prompts, 80)
               for backend in ("torch", "graph")}
    assert results["graph"].tokens == results["torch"].tokens


def test_static_step_with_quantized_layers_matches_the_eager_step():
    from nibble.quantize import RTNConfig, quantize_

    model = make_llama("gqa-tied", seed=4)
    quantize_(model, RTNConfig(bits=4, group_size=32), None, progress=False)
    prompts = [[1, 2, 3, 4], [7, 8]]
    eager = generate(build_runtime(model, max_len=96, batch_size=2, backend="torch"), prompts, 70)
    static = generate(static_runtime(model, max_len=96, batch_size=2), prompts, 70)
    assert static.tokens == eager.tokens
