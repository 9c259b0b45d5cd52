import pytest
import torch
from safetensors.torch import load_file

from conftest import save_transformers_model, tiny_gpt2, tiny_llama
from nibble.calibrate.pipeline import HessianAccumulator, calibrate_model, capture_block_inputs
from nibble.errors import NonFiniteError
from nibble.formats.checkpoint import PartialRun
from nibble.formats.scalar import ScalarQuantLinear
from nibble.models import decoder_blocks, linear_layers, load_model
from nibble.quantize import CalibrationConfig, GPTQConfig, quantize_, quantize_to_dir
from nibble.quantize.api import make_quantizer


def windows(n=6, length=32, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_captured_inputs_reproduce_the_first_block_input(make):
    model = make()
    data = windows()
    inputs, kwargs = capture_block_inputs(model, data, batch_size=4, offload=False)
    assert [x.shape[0] for x in inputs] == [4, 2]
    recorded = []
    handle = decoder_blocks(model)[0].register_forward_pre_hook(
        lambda m, args, kw: recorded.append(args[0] if args else kw["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=data, use_cache=False)
    handle.remove()
    torch.testing.assert_close(torch.cat(inputs), recorded[0])


def test_hessian_equals_direct_xtx_and_is_shared_by_layers_with_one_input():
    model = tiny_llama()
    block = decoder_blocks(model)[0]
    layers = linear_layers(block)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = args[0].flatten(0, -2)
        return hook

    hooks = [layers[n].register_forward_hook(record(n)) for n in ("self_attn.q_proj", "mlp.down_proj")]
    accumulator = HessianAccumulator(layers)
    inputs, kwargs = capture_block_inputs(model, windows(2), 2, False)
    with torch.no_grad():
        block(inputs[0], **kwargs)
    hessians = accumulator.finish()
    for h in hooks:
        h.remove()
    for name, x in seen.items():
        torch.testing.assert_close(hessians[name], (x.double().T @ x.double()) / x.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hessians["self_attn.q_proj"], hessians["self_attn.k_proj"])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_every_block_linear_is_replaced_and_logits_stay_close(make):
    model = make()
    reference = make()
    data = windows()
    reports = quantize_(model, GPTQConfig(bits=8, group_size=32), data, batch_size=3, progress=False)
    assert len(reports) == len(decoder_blocks(model))
    for block in decoder_blocks(model):
        assert all(not isinstance(m, torch.nn.Linear) or isinstance(m, ScalarQuantLinear)
                   for m in block.modules())
        assert any(isinstance(m, ScalarQuantLinear) for m in block.modules())
    with torch.no_grad():
        ours, theirs = model(input_ids=data).logits, reference(input_ids=data).logits
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_nan_in_calibration_activations_is_reported():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    data = windows()
    data[0, 3] = 7
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        calibrate_model(model, make_quantizer(GPTQConfig()), data, progress=False)


def test_resume_after_interrupted_block_gives_the_uninterrupted_result(tmp_path, tokenizer, corpus_file, monkeypatch):
    source = str(save_transformers_model(tiny_llama(layers=3), tokenizer, tmp_path / "src"))
    config = GPTQConfig(bits=3, group_size=32)
    calibration = CalibrationConfig(str(corpus_file), nsamples=6, seqlen=48, seed=1, batch_size=3)

    quantize_to_dir(load_model(source), tokenizer, source, config, calibration, tmp_path / "whole", progress=False)

    original = PartialRun.save_block

    def save_then_crash(self, index, block):
        original(self, index, block)
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialRun, "save_block", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        quantize_to_dir(load_model(source), tokenizer, source, config, calibration, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "nibble_config.json").exists()
    monkeypatch.setattr(PartialRun, "save_block", original)
    summary = quantize_to_dir(load_model(source), tokenizer, source, config, calibration, tmp_path / "cut",
                              resume=True, progress=False)
    assert summary["resumed_from_block"] == 2
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert not (tmp_path / "cut" / ".nibble-partial").exists()
