"""Export to the transformers + aqlm layout, import back bit-exactly, and load with the aqlm package."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nibble.errors import CheckpointError
from nibble.formats.aqlm import AQLMLinear, index_to_codes
from nibble.formats.hf_export import (
    export_hf,
    import_hf,
    layer_to_aqlm,
    load_with_transformers,
    pack_codes,
    unpack_codes,
)
from nibble.models.architecture import set_submodule



def tiny_llama(hidden=64, intermediate=128, kv_heads=2, tie=False, bias=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=256,
                         tie_word_embeddings=tie, attention_bias=bias)
    return LlamaForCausalLM(config).eval()


def quantize_randomly(model, num_codebooks, nbits, group_size=8, seed=0):
    """Replace every linear of the decoder blocks by a random (float16-representable) AQLM layer."""
    g = torch.Generator().manual_seed(seed)
    for name, linear in list(model.named_modules()):
        if isinstance(linear, nn.Linear) and name.startswith("model.layers."):
            out_features, in_features = linear.weight.shape
            index = torch.randint(0, 2**nbits, (out_features, in_features // group_size, num_codebooks), generator=g)
            codebooks = (torch.randn(num_codebooks, 2**nbits, group_size, generator=g) / num_codebooks**0.5).half()
            scales = (0.02 + 0.02 * torch.rand(out_features, generator=g)).half()
            set_submodule(model, name, AQLMLinear(
                in_features, out_features, num_codebooks, nbits, group_size, bias=linear.bias,
                codes=index_to_codes(index, nbits), codebooks=codebooks.float(), scales=scales.float()))
    return model


def perplexity(model, ids):
    with torch.no_grad():
        logits = model(ids).logits.float()
    return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


class StubTokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer_config.json").write_text("{}")


@pytest.mark.parametrize("nbits", [8, 9, 12, 16])
def test_code_packing_matches_aqlm_convention(nbits):
    index = torch.tensor([0, 1, 2 ** (nbits - 1) - 1, 2 ** (nbits - 1), 2**nbits - 1])
    packed = pack_codes(index, nbits)
    assert packed.dtype == (torch.int8 if nbits <= 8 else torch.int16)
    assert torch.equal(unpack_codes(packed, nbits), index)
    aqlm_utils = pytest.importorskip("aqlm.utils")
    assert torch.equal(packed, aqlm_utils.pack_int_data(index.clone(), nbits))
    assert torch.equal(aqlm_utils.unpack_int_data(packed, nbits), index)


@pytest.mark.parametrize("num_codebooks,nbits,group_size", [(1, 8, 8), (2, 8, 8), (3, 8, 4), (1, 12, 8), (1, 16, 16)])
def test_layer_tensors_follow_the_aqlm_layout(num_codebooks, nbits, group_size):
    model = quantize_randomly(tiny_llama(bias=True), num_codebooks, nbits, group_size)
    layer = model.model.layers[0].self_attn.k_proj
    tensors = layer_to_aqlm(layer)
    assert tensors["codes"].shape == (32, 64 // group_size, num_codebooks)
    assert tensors["codebooks"].shape == (num_codebooks, 2**nbits, 1, group_size)
    assert tensors["scales"].shape == (32, 1, 1, 1) and tensors["codebooks"].dtype == torch.float16
    assert torch.equal(tensors["bias"], layer.bias)
    aqlm_utils = pytest.importorskip("aqlm.utils")
    weight = aqlm_utils._dequantize_weight(aqlm_utils.unpack_int_data(tensors["codes"], nbits),
                                           tensors["codebooks"].float(), tensors["scales"].float())
    assert torch.allclose(weight, layer.dequantize(), atol=1e-6)


@pytest.mark.parametrize("num_codebooks,nbits,tie,bias",
                         [(2, 8, False, False), (1, 12, True, True), (3, 8, True, False)])
def test_export_import_round_trip_is_bit_exact(tmp_path, num_codebooks, nbits, tie, bias):
    model = quantize_randomly(tiny_llama(tie=tie, bias=bias), num_codebooks, nbits)
    export_hf(model, StubTokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "aqlm"
    assert (quant["num_codebooks"], quant["nbits_per_codebook"], quant["in_group_size"], quant["out_group_size"]) == (
        num_codebooks, nbits, 8, 1)
    assert "lm_head.weight" in quant["linear_weights_not_to_quantize"]
    assert not any("layers" in name for name in quant["linear_weights_not_to_quantize"])
    assert (tmp_path / "tokenizer_config.json").is_file()

    back = import_hf(tmp_path)
    original, loaded = dict(model.named_modules()), dict(back.named_modules())
    for name, module in original.items():
        if isinstance(module, AQLMLinear):
            other = loaded[name]
            assert isinstance(other, AQLMLinear)
            assert other.codes.dtype == module.codes.dtype
            for part in ("codes", "codebooks", "scales"):
                assert torch.equal(getattr(other, part), getattr(module, part)), (name, part)
            assert (other.bias is None) == (module.bias is None)
            if module.bias is not None:
                assert torch.equal(other.bias, module.bias)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    if tie:
        assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_export_refuses_mixed_configs(tmp_path):
    model = quantize_randomly(tiny_llama(), 2, 8)
    layer = model.model.layers[1].mlp.down_proj
    set_submodule(model, "model.layers.1.mlp.down_proj", AQLMLinear(layer.in_features, layer.out_features, 1, 8, 8))
    with pytest.raises(CheckpointError, match="mixes"):
        export_hf(model, None, tmp_path)


def test_import_rejects_folders_without_aqlm(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="aqlm"):
        import_hf(tmp_path)


@pytest.mark.parametrize("num_codebooks,nbits,shape", [
    (2, 8, dict(hidden=64, intermediate=64, kv_heads=4)),    # aqlm's numba LUT kernel (one shape: one compile)
    (1, 12, dict(hidden=64, intermediate=128, kv_heads=2)),  # aqlm's dequantize-then-matmul path
])
def test_transformers_with_aqlm_package_gives_the_same_perplexity(tmp_path, num_codebooks, nbits, shape):
    pytest.importorskip("aqlm")
    pytest.importorskip("numba")
    model = quantize_randomly(tiny_llama(**shape), num_codebooks, nbits)
    export_hf(model, None, tmp_path)
    # sets numba to one thread: aqlm <= 1.1.7's CPU kernel races on several (Vahe1994/AQLM#86)
    hf = load_with_transformers(tmp_path)
    assert type(hf.model.layers[0].mlp.down_proj).__module__.startswith("aqlm")
    assert isinstance(hf.lm_head, nn.Linear)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    ours, theirs = perplexity(model, ids), perplexity(hf, ids)
    assert abs(theirs - ours) / ours < 0.005
    with torch.no_grad():
        assert torch.allclose(hf(ids[:1, :3]).logits, model(ids[:1, :3]).logits, atol=1e-4)  # gemv path too
