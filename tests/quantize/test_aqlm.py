"""AQLM layer quantizer: config, k-means + alternation, beam search, block fine-tuning."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

from nibble.calibrate.pipeline import BlockData
from nibble.errors import ConfigError
from nibble.formats.aqlm import AQLMLinear, dequantize_additive
from nibble.quantize.aqlm import AQLMConfig, AQLMQuantizer, fit_aqlm, prepare_hessian, relative_error
from nibble.quantize.aqlm_search import beam_search
from nibble.quantize.base import METHODS, config_from_dict

# small, quick settings; each test overrides what it checks
TINY = dict(max_iterations=4, tolerance=0.0, kmeans_iterations=6, codebook_steps=3, beam_size=2)



def correlated_problem(out_features: int, in_features: int, seed: int = 0, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_features) + 0.5 * torch.randn(in_features, in_features, generator=g) / in_features**0.5
    x = torch.randn(tokens, in_features, generator=g) @ mix
    weight = torch.randn(out_features, in_features, generator=g) * (1 + torch.rand(out_features, 1, generator=g))
    return weight, (x.T @ x).double()


def objective(weight, hessian, codes, codebooks, scales):
    approx = dequantize_additive(codes, codebooks, scales)
    residual = weight - approx
    return float(((residual @ hessian) * residual).sum())


# --- config --------------------------------------------------------------------------------------

def test_presets_overrides_and_round_trip():
    default, fast = AQLMConfig.preset("default"), AQLMConfig.preset("fast")
    assert default.preset_name == "default" and fast.preset_name == "fast"
    assert AQLMConfig().preset_name == "default"
    assert fast.beam_size < default.beam_size and fast.max_iterations < default.max_iterations
    custom = AQLMConfig.preset("fast", num_codebooks=1, nbits_per_codebook=12)
    assert (custom.num_codebooks, custom.nbits_per_codebook, custom.beam_size) == (1, 12, fast.beam_size)
    assert config_from_dict(custom.to_dict()) == custom
    assert METHODS["aqlm"] == (AQLMConfig, AQLMQuantizer)
    assert custom.to_dict()["method"] == "aqlm"


@pytest.mark.parametrize("bad", [
    dict(num_codebooks=0), dict(num_codebooks=9), dict(nbits_per_codebook=7), dict(nbits_per_codebook=17),
    dict(group_size=5), dict(beam_size=0), dict(codebook_optimizer="sgd"), dict(tolerance=-1.0),
])
def test_invalid_settings_raise(bad):
    with pytest.raises(ConfigError):
        AQLMConfig.preset("default", **bad)


def test_unknown_preset_or_field():
    with pytest.raises(ConfigError, match="preset"):
        AQLMConfig.preset("turbo")
    with pytest.raises(ConfigError, match="beam"):
        AQLMConfig.preset("default", beam=3)


def test_bits_accounting_is_honest():
    config = AQLMConfig.preset("default")  # 2x8, g=8
    bpw = config.bits_per_weight(1536, 576)
    expected = (1536 * 72 * 2 * 8 + 2 * 256 * 8 * 16 + 1536 * 16) / (1536 * 576)
    assert bpw == pytest.approx(expected)
    assert 2.1 < bpw < 2.11  # codes 2.0 + codebooks 0.074 + scales 0.028
    big = AQLMConfig.preset("default", num_codebooks=1, nbits_per_codebook=16)
    # 1x16 on a 576x576 layer: the codebook (65536·8·16 bits) outweighs the codes (576·72·16 bits)
    assert big.bits_per_weight(576, 576) > 5


def test_warns_when_codebooks_cost_more_than_codes(caplog):
    weight, hessian = correlated_problem(16, 32)
    linear = nn.Linear(32, 16, bias=False)
    linear.weight.data.copy_(weight)
    quantizer = AQLMQuantizer(AQLMConfig.preset("fast", num_codebooks=1, nbits_per_codebook=10, **TINY))
    with caplog.at_level(logging.WARNING, logger="nibble.quantize.aqlm"):
        quantizer.quantize_layer("tiny", linear, hessian)
    assert any("cost more bits than the codes" in r.getMessage() for r in caplog.records)


# --- the layer fit -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_codebooks,nbits,group_size,shape", [
    (1, 8, 8, (64, 48)), (2, 8, 8, (48, 64)), (1, 9, 8, (64, 96)), (3, 8, 4, (96, 64)), (2, 8, 16, (64, 128)),
])
def test_error_falls_over_alternations(num_codebooks, nbits, group_size, shape):
    weight, hessian = correlated_problem(*shape)
    config = AQLMConfig.preset("default", num_codebooks=num_codebooks, nbits_per_codebook=nbits,
                               group_size=group_size, **TINY)
    result = fit_aqlm(weight, hessian, config)
    losses = result.losses
    assert len(losses) == config.max_iterations + 1
    assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.97 * losses[0]
    # the returned tensors reproduce the reported (float16-rounded) error
    h = prepare_hessian(hessian, config.damping, weight.device)
    approx = result.scales[:, None] * sum(result.codebooks[m][result.index[..., m]] for m in range(num_codebooks)
                                          ).reshape(shape)
    assert relative_error(weight, h, approx) == pytest.approx(result.final_loss, rel=1e-4)
    assert result.final_loss < 0.5
    assert torch.equal(result.codebooks, result.codebooks.half().float())
    assert torch.equal(result.scales, result.scales.half().float())


def test_more_codebooks_give_lower_error():
    weight, hessian = correlated_problem(64, 64, seed=3)
    errors = [fit_aqlm(weight, hessian, AQLMConfig.preset("fast", num_codebooks=m, **TINY)).final_loss
              for m in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2], errors


def test_beats_round_to_nearest_at_similar_bits():
    """2x8 (2 bits/weight of codes) is well below a 2-bit min-max RTN with groups of 8."""
    weight, hessian = correlated_problem(64, 64, seed=4)
    result = fit_aqlm(weight, hessian, AQLMConfig.preset("fast", **TINY))
    groups = weight.reshape(-1, 8)
    low, high = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
    step = (high - low) / 3
    rtn = (torch.round((groups - low) / step) * step + low).reshape(weight.shape)
    h = prepare_hessian(hessian, 0.01, weight.device)
    assert result.final_loss < 0.7 * relative_error(weight, h, rtn)


def test_adam_codebook_optimizer_also_descends():
    weight, hessian = correlated_problem(64, 64, seed=5)
    config = AQLMConfig.preset("fast", codebook_optimizer="adam", adam_lr=1e-2, num_codebooks=1,
                               **{**TINY, "codebook_steps": 20})
    result = fit_aqlm(weight, hessian, config)
    assert result.losses[-1] < 0.97 * result.losses[0]


def test_deterministic_for_a_seed():
    weight, hessian = correlated_problem(32, 64, seed=6)
    config = AQLMConfig.preset("fast", **TINY)
    a, b = fit_aqlm(weight, hessian, config), fit_aqlm(weight, hessian, config)
    assert torch.equal(a.index, b.index) and torch.equal(a.codebooks, b.codebooks) and torch.equal(a.scales, b.scales)
    c = fit_aqlm(weight, hessian, AQLMConfig.preset("fast", seed=1, **TINY))
    assert not torch.equal(a.codebooks, c.codebooks)


def test_kmeans_with_more_codewords_than_groups():
    """1x12 on a tiny layer: 4096 codewords, 64 groups — the init must still be exact-ish and finite."""
    weight, hessian = correlated_problem(16, 32, seed=7)
    result = fit_aqlm(weight, hessian, AQLMConfig.preset("fast", num_codebooks=1, nbits_per_codebook=12, **TINY))
    assert torch.isfinite(result.codebooks).all()
    assert result.final_loss < 0.05


# --- beam search ---------------------------------------------------------------------------------

def random_state(out_features, in_features, num_codebooks, nbits, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**nbits, (out_features, in_features // group_size, num_codebooks), generator=g)
    codebooks = torch.randn(num_codebooks, 2**nbits, group_size, generator=g) * 0.5
    scales = torch.rand(out_features, generator=g) + 0.5
    return codes, codebooks, scales


@pytest.mark.parametrize("num_codebooks,nbits,group_size,beam", [
    (1, 8, 8, 1), (2, 8, 8, 1), (2, 8, 8, 4), (3, 8, 4, 3), (1, 11, 8, 2), (2, 9, 16, 2),
])
@pytest.mark.parametrize("use_hessian", [True, False])
def test_beam_search_never_worse_than_start(num_codebooks, nbits, group_size, beam, use_hessian):
    weight, hessian = correlated_problem(24, 64, seed=nbits + beam)
    h = prepare_hessian(hessian, 0.01, weight.device) if use_hessian else torch.eye(64)
    for seed in range(2):
        codes, codebooks, scales = random_state(24, 64, num_codebooks, nbits, group_size, seed)
        before = objective(weight, h, codes, codebooks, scales)
        new = beam_search(weight, codes, codebooks, scales, hessian=h if use_hessian else None, beam_size=beam,
                          block_groups=3)
        after = objective(weight, h, new, codebooks, scales)
        assert after <= before * (1 + 1e-6)
        assert after < 0.9 * before  # random starting codes are far from optimal
        # starting from its own output the search cannot get worse either
        again = beam_search(weight, new, codebooks, scales, hessian=h if use_hessian else None, beam_size=beam)
        assert objective(weight, h, again, codebooks, scales) <= after * (1 + 1e-6)


def test_full_beam_finds_the_exact_optimum_for_two_codebooks():
    """With beam = 2**B the search over 2 codebooks is exhaustive: compare with brute force."""
    codes, codebooks, scales = random_state(3, 16, 2, 8, 8, seed=11)
    weight = torch.randn(3, 16)
    new = beam_search(weight, codes, codebooks, scales, hessian=None, beam_size=256)
    pairs = (codebooks[0][:, None, :] + codebooks[1][None, :, :]).reshape(-1, 8)       # [K*K, g]
    for o, j in itertools.product(range(3), range(2)):
        target = weight[o, j * 8:(j + 1) * 8]
        errors = ((scales[o] * pairs - target) ** 2).sum(1)
        chosen = new[o, j, 0] * 256 + new[o, j, 1]
        assert errors[chosen] <= errors.min() * (1 + 1e-5) + 1e-7


def test_single_codebook_identity_is_nearest_codeword():
    codes, codebooks, scales = random_state(5, 32, 1, 8, 8, seed=12)
    weight = torch.randn(5, 32)
    new = beam_search(weight, codes, codebooks, scales, hessian=None, beam_size=1)
    target = (weight / scales[:, None]).reshape(5, 4, 1, 8)
    nearest = ((target - codebooks[0]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(new[..., 0], nearest)


def test_mask_limits_the_changed_groups():
    weight, hessian = correlated_problem(16, 64, seed=13)
    h = prepare_hessian(hessian, 0.01, weight.device)
    codes, codebooks, scales = random_state(16, 64, 2, 8, 8, seed=13)
    mask = torch.zeros(16, 8, dtype=torch.bool)
    mask[::3, 1::2] = True
    for hess in (h, None):
        new = beam_search(weight, codes, codebooks, scales, hessian=hess, beam_size=2, mask=mask)
        changed = (new != codes).any(-1)
        assert changed.any() and not (changed & ~mask).any()
        metric = h if hess is not None else torch.eye(64)
        assert objective(weight, metric, new, codebooks, scales) < objective(weight, metric, codes, codebooks, scales)


# --- the quantizer and block fine-tuning ---------------------------------------------------------

def test_quantize_layer_builds_an_aqlm_linear():
    weight, hessian = correlated_problem(96, 64, seed=14)
    linear = nn.Linear(64, 96, bias=True)
    linear.weight.data.copy_(weight)
    config = AQLMConfig.preset("fast", **TINY)
    quantizer = AQLMQuantizer(config)
    module = quantizer.quantize_layer("layer", linear, hessian)
    assert isinstance(module, AQLMLinear) and module.codes.dtype == torch.uint8
    assert module.codes.shape == (96, 8, 2) and module.codebooks.shape == (2, 256, 8)
    assert torch.equal(module.bias, linear.bias)
    stats = quantizer.layer_stats["layer"]
    h = prepare_hessian(hessian, config.damping, weight.device)
    assert relative_error(weight, h, module.dequantize()) == pytest.approx(stats["rel_error"], rel=1e-4)
    assert stats["rel_error"] < stats["rel_error_init"]
    x = torch.randn(5, 64)
    # small batches run the lookup-table kernel: float32 sums in another order than the dense matmul
    torch.testing.assert_close(module(x), nn.functional.linear(x, module.dequantize(), linear.bias), rtol=1e-4, atol=1e-4)
    wide = AQLMQuantizer(AQLMConfig.preset("fast", num_codebooks=1, nbits_per_codebook=9, **TINY))
    assert wide.quantize_layer("layer", linear, hessian).codes.dtype == torch.int16


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).eval()


def block_calibration(model, block, batches):
    """Inputs, full-precision outputs and a ``run`` for one decoder block (as the pipeline does)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("kwargs", {k: v for k, v in kwargs.items() if k != "past_key_values"})
        captured.setdefault("inputs", []).append(args[0].detach().clone())

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        for ids in batches:
            model(ids)
    handle.remove()
    kwargs = captured["kwargs"]

    def run(blk, hidden):
        out = blk(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        targets = [run(block, x) for x in captured["inputs"]]
    return captured["inputs"], targets, run


def quantized_tiny_block(num_microbatches: int):
    model = tiny_llama()
    block = model.model.layers[0]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 64), generator=gen) for _ in range(num_microbatches)]
    inputs, targets, run = block_calibration(model, block, batches)
    hessians: dict[str, torch.Tensor] = {}

    def collect(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            hessians[name] = hessians.get(name, 0) + x.T @ x
        return hook

    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_hook(collect(n)) for n, m in linears]
    with torch.no_grad():
        for x in inputs:
            run(block, x)
    for h in hooks:
        h.remove()
    config = AQLMConfig.preset("fast", num_codebooks=1, finetune_epochs=4, finetune_lr=1e-4,
                               finetune_tolerance=0.0, **{**TINY, "max_iterations": 1})
    quantizer = AQLMQuantizer(config)
    for name, linear in linears:
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, quantizer.quantize_layer(name, linear, hessians[name]))
    return quantizer, block, BlockData(inputs, targets, run, torch.device("cpu"))


def test_finetune_block_lowers_block_error_codes_fixed():
    quantizer, block, data = quantized_tiny_block(1)  # one microbatch: trained and measured on it
    layers = [m for m in block.modules() if isinstance(m, AQLMLinear)]
    assert len(layers) == 7
    codes_before = [m.codes.clone() for m in layers]
    books_before = [m.codebooks.detach().clone() for m in layers]
    norm_before = block.input_layernorm.weight.detach().clone()
    flags_before = [p.requires_grad for p in block.parameters()]
    metrics = quantizer.finetune_block(block, data)
    assert metrics["finetune_loss_after"] < 0.99 * metrics["finetune_loss_before"]
    assert metrics["finetune_epochs"] == 4
    assert all(torch.equal(a, m.codes) for a, m in zip(codes_before, layers))
    assert not all(torch.equal(a, m.codebooks) for a, m in zip(books_before, layers))
    assert not torch.equal(norm_before, block.input_layernorm.weight)
    for m in layers:
        assert torch.equal(m.codebooks, m.codebooks.half().float()) and not m.codebooks.requires_grad
        assert torch.equal(m.scales, m.scales.half().float())
    assert [p.requires_grad for p in block.parameters()] == flags_before
    assert quantizer.finetune_block(block, BlockData(data.inputs, None, data.run, data.device)) == {}


def test_finetune_block_keeps_the_best_held_out_state():
    """The last microbatch is held out; whatever happens, the block is never left worse on it."""
    quantizer, block, data = quantized_tiny_block(4)
    metrics = quantizer.finetune_block(block, data)
    assert metrics["finetune_loss_after"] <= metrics["finetune_loss_before"] * (1 + 1e-3)
