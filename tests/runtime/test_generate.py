"""Generation loop, sampling, cache bounds, non-dense linears and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from runtime.runtime_models import hf_logits, make_llama
from torch import nn

from nibble.errors import UnsupportedArchitectureError
from nibble.runtime import KVCacheFullError, SamplingConfig, build_runtime, generate
from nibble.runtime.sampling import Sampler, filtered_probs


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_greedy_tokens_match_transformers_generate(backend: str):
    model = make_llama(layers=3)
    prompt = [5, 17, 99, 3, 250]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  use_cache=True, pad_token_id=0)[0, len(prompt):].tolist()
    runtime = build_runtime(model, max_len=32, backend=backend)
    result = generate(runtime, [prompt], max_new_tokens=12)
    assert result.tokens[0] == expected
    assert result.decode_steps == 11 and result.tokens_per_s > 0 and result.prompt_tokens_per_s > 0


def test_batched_generation_equals_one_row_at_a_time():
    model = make_llama()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12], [42]]
    batched = generate(build_runtime(model, max_len=24, batch_size=3), prompts, max_new_tokens=6)
    single = build_runtime(model, max_len=24)
    for prompt, tokens in zip(prompts, batched.tokens):
        assert generate(single, [prompt], max_new_tokens=6).tokens[0] == tokens


def test_stop_tokens_end_a_row_early():
    model = make_llama()
    runtime = build_runtime(model, max_len=24)
    free = generate(runtime, [[1, 2, 3]], max_new_tokens=8).tokens[0]
    stopped = generate(runtime, [[1, 2, 3]], max_new_tokens=8, stop_tokens={free[2]})
    assert stopped.tokens[0] == free[:free.index(free[2]) + 1] and stopped.stopped == [True]


def test_kv_cache_bounds():
    runtime = build_runtime(make_llama(), max_len=8)
    result = generate(runtime, [[1, 2, 3, 4, 5]], max_new_tokens=100)
    assert len(result.tokens[0]) == 4  # 5 prompt slots + 3 fed tokens fill all 8 slots
    with pytest.raises(KVCacheFullError, match="max_len 8"):
        generate(runtime, [list(range(9))], max_new_tokens=1)
    runtime.start()
    runtime.feed(torch.tensor([list(range(8))]))
    with pytest.raises(KVCacheFullError):
        runtime.feed(torch.tensor([1]))
    runtime.rewind(7)
    assert runtime.feed(torch.tensor([1])).shape == (1, 256)


def test_seeded_sampling_is_reproducible_and_varies_with_seed():
    runtime = build_runtime(make_llama(), max_len=40)
    config = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = generate(runtime, [[1, 2]], 20, config).tokens[0]
    assert generate(runtime, [[1, 2]], 20, config).tokens[0] == first
    other = generate(runtime, [[1, 2]], 20, SamplingConfig(temperature=1.5, seed=8)).tokens[0]
    assert other != first


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    assert Sampler(SamplingConfig())(logits).tolist() == [1]
    assert Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=0))(logits).tolist() == [1]
    probs = filtered_probs(logits, top_k=2, top_p=1.0)
    assert (probs[0, [0, 3]] == 0).all() and probs[0, 1] > probs[0, 2] > 0
    nucleus = filtered_probs(logits, top_k=0, top_p=0.7)  # p(best) ~ 0.64 < 0.7, so two survive
    assert (nucleus[0] > 0).tolist() == [False, True, True, False]
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


class DenseLikeQuantized(nn.Module):
    """Stands in for a quantized format: not an nn.Linear, computes x W^T + b its own way."""

    def __init__(self, linear: nn.Linear, use_runtime_linear: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        if use_runtime_linear:
            self.runtime_linear = lambda: (lambda x: F.linear(x, self.weight, self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_non_dense_linears_are_called_as_modules(backend: str):
    model = make_llama("mha-bias-untied")
    tokens = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(6))
    reference = hf_logits(model, tokens)
    for index, (name, module) in enumerate(list(model.named_modules())):
        if isinstance(module, nn.Linear) and "layers.1" in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, DenseLikeQuantized(module, index % 2 == 0))
    model.lm_head = DenseLikeQuantized(model.lm_head, False)
    runtime = build_runtime(model, max_len=8, backend=backend)
    runtime.start()
    runtime.feed(tokens[:, :6])
    torch.testing.assert_close(runtime.feed(tokens[:, 6]), reference[:, 6], atol=1e-4, rtol=0)


def test_errors_name_the_problem():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported: llama"):
        build_runtime(gpt2)
    with pytest.raises(ValueError, match="unknown backend"):
        build_runtime(make_llama(), backend="tpu")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(build_runtime(make_llama(), max_len=8), [[1]], 0)


TEST_KERNEL = r"""
#include <cstdint>
#include <cstring>
struct Dense { const float* weight; int64_t in; };
static int64_t prepared = 0;
extern "C" int64_t prepare_calls() { return prepared; }
// workspace = 2 * x: checks that prepare runs first and the workspace reaches compute
// in two parts (inputs split in halves), as the runtime calls it with prepare_parts = 2
extern "C" void prepare(void* ctx, const float* x, int64_t x_stride, int64_t rows, float* workspace,
                        int64_t part, int64_t parts) {
    if (part == 0) ++prepared;
    const int64_t in = static_cast<Dense*>(ctx)->in;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = in * part / parts; i < in * (part + 1) / parts; ++i)
            workspace[r * in + i] = 2.0f * x[r * x_stride + i];
}
extern "C" void compute(void* ctx, const float* x, int64_t x_stride, const float* workspace, float* y,
                        int64_t y_stride, int64_t rows, int64_t begin, int64_t end) {
    const Dense* d = static_cast<Dense*>(ctx);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = begin; o < end; ++o) {
            float total = 0.0f;
            for (int64_t i = 0; i < d->in; ++i) total += workspace[r * d->in + i] * d->weight[o * d->in + i];
            y[r * y_stride + o] = 0.5f * total;
        }
}
"""


class CKernelLinear(nn.Module):
    """A bias-free linear offering a C kernel to the C++ decode step."""

    def __init__(self, linear: nn.Linear, library):
        import ctypes

        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone().contiguous())
        self.library = library

        class Dense(ctypes.Structure):
            _fields_ = [("weight", ctypes.c_void_p), ("in_features", ctypes.c_int64)]
        self.context = Dense(self.weight.data_ptr(), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def runtime_ckernel(self):
        import ctypes

        from nibble.runtime.linears import CKernel

        address = lambda name: ctypes.cast(getattr(self.library, name), ctypes.c_void_p).value  # noqa: E731
        return CKernel(compute=address("compute"), context=ctypes.addressof(self.context),
                       prepare=address("prepare"), workspace_per_row=self.in_features, chunk=16,
                       keep_alive=self, prepare_parts=2)


def test_c_kernels_are_called_from_the_cpp_step(tmp_path, monkeypatch):
    import ctypes

    from nibble.runtime import native

    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "test_kernel.cpp"
    source.write_text(TEST_KERNEL)
    library = ctypes.CDLL(str(native.build(source, headers=())))
    model = make_llama()
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(7))
    reference = hf_logits(model, tokens)
    for block in model.model.layers:
        block.mlp.down_proj = CKernelLinear(block.mlp.down_proj, library)
        block.self_attn.q_proj = CKernelLinear(block.self_attn.q_proj, library)
    runtime = build_runtime(model, max_len=8, batch_size=2, backend="cpp")
    runtime.start()
    runtime.feed(tokens[:, :5])
    library.prepare_calls.restype = ctypes.c_int64
    assert library.prepare_calls() == 0  # the prompt went through the torch step
    torch.testing.assert_close(runtime.feed(tokens[:, 5]), reference[:, 5], atol=1e-4, rtol=0)
    assert library.prepare_calls() == 2 * len(model.model.layers)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.8, top_k=20, seed=3)])
def test_next_tokens_is_sampler_of_feed(backend: str, sampling: SamplingConfig):
    model = make_llama()
    prompts = torch.tensor([[0, 0, 4, 9], [3, 1, 4, 1]])
    lean, plain = (build_runtime(model, max_len=16, batch_size=2, backend=backend) for _ in range(2))
    for runtime in (lean, plain):
        runtime.start([2, 0])
        runtime.feed(prompts)
    lean_sampler, plain_sampler = Sampler(sampling), Sampler(sampling)
    tokens = [5, 6]
    for _ in range(4):
        picked = lean.next_tokens(tokens, lean_sampler)
        assert picked == plain_sampler(plain.feed(torch.tensor(tokens))).tolist()
        assert lean.cache.length == plain.cache.length
        tokens = picked
    with pytest.raises(ValueError, match="batch of 1 rows"):
        lean.next_tokens([1], lean_sampler)


@pytest.mark.parametrize("cols", [1, 7, 8, 29, 4096])
def test_native_argmax_matches_torch_ties_and_nans(cols: int):
    import ctypes

    from nibble.runtime.native import load_library

    library = load_library()
    generator = torch.Generator().manual_seed(cols)
    rows = torch.randint(-3, 4, (6, cols), generator=generator).float()  # few values: many ties
    rows[1, cols // 2] = float("inf")
    rows[2, -1] = float("nan")
    rows[3, cols // 3] = float("nan")
    rows[4] = float("-inf")
    out = torch.full((6,), -1, dtype=torch.long)
    library.nb_argmax_rows(ctypes.c_void_p(rows.data_ptr()), ctypes.c_int64(6), ctypes.c_int64(cols),
                           ctypes.c_void_p(out.data_ptr()))
    assert out.tolist() == rows.argmax(dim=-1).tolist()


def test_native_silu_matches_torch_over_a_wide_range():
    import ctypes

    from nibble.runtime.native import load_library

    gate = torch.cat([torch.linspace(-120, 120, 4001), torch.randn(1000) * 4, torch.tensor([0.0, -0.0, 1e-30])])
    up = torch.randn(gate.shape[0])
    expected = F.silu(gate.double()) * up.double()
    got = gate.clone()
    load_library().nb_silu_times(ctypes.c_void_p(got.data_ptr()), ctypes.c_void_p(up.data_ptr()),
                                 ctypes.c_int64(gate.shape[0]))
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-30)
