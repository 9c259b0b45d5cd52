import json

import pytest
import torch

from conftest import save_transformers_model, tiny_gpt2, tiny_llama
from nibble.errors import CheckpointError, OutputExistsError
from nibble.formats.checkpoint import PARTIAL, prepare_output_dir
from nibble.models import load_model
from nibble.quantize import CalibrationConfig, RTNConfig, quantize_to_dir


@pytest.fixture
def quantized_dir(tmp_path, tokenizer, corpus_file):
    source = str(save_transformers_model(tiny_llama(), tokenizer, tmp_path / "src"))
    out = tmp_path / "q"
    quantize_to_dir(load_model(source), tokenizer, source, RTNConfig(4, 32),
                    CalibrationConfig(str(corpus_file), 4, 32), out, progress=False)
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_saved_model_reloads_with_identical_logits(make, tmp_path, tokenizer, corpus_file):
    model = make()
    out = tmp_path / "q"
    summary = quantize_to_dir(model, tokenizer, "tiny", RTNConfig(2, 32), CalibrationConfig(str(corpus_file), 4, 32),
                              out, progress=False)
    reloaded = load_model(str(out))
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        model.half().float()  # the checkpoint stores non-quantized tensors in float16
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    config = json.loads((out / "nibble_config.json").read_text())
    assert config["quantization"] == {"method": "rtn", "bits": 2, "group_size": 32, "symmetric": False}
    assert config["size"]["bits_per_weight"] == pytest.approx(2 + 24 / 32)
    assert summary["weights"]["bytes"] == (out / "model.safetensors").stat().st_size


def test_truncated_weights_are_refused(quantized_dir):
    weights = quantized_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(str(quantized_dir))


def test_corrupted_weights_are_refused(quantized_dir):
    weights = quantized_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(str(quantized_dir))


def test_corrupt_config_is_refused(quantized_dir):
    (quantized_dir / "nibble_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(str(quantized_dir))


def test_non_empty_output_folder_is_refused_and_left_alone(quantized_dir, tokenizer, corpus_file):
    before = {p.name: p.stat().st_mtime_ns for p in quantized_dir.iterdir()}
    with pytest.raises(OutputExistsError, match="not empty"):
        quantize_to_dir(tiny_llama(), tokenizer, "tiny", RTNConfig(), CalibrationConfig(str(corpus_file)), quantized_dir)
    assert {p.name: p.stat().st_mtime_ns for p in quantized_dir.iterdir()} == before


def test_resume_without_partial_run_is_refused(tmp_path, tokenizer, corpus_file):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        quantize_to_dir(tiny_llama(), tokenizer, "tiny", RTNConfig(), CalibrationConfig(str(corpus_file)),
                        tmp_path / "new", resume=True)


def test_folder_left_by_a_run_that_failed_to_start_is_reused(tmp_path):
    out = tmp_path / "out"
    (out / PARTIAL).mkdir(parents=True)  # what a run that died before its first checkpoint leaves
    assert prepare_output_dir(out, resume=False) == out
    (out / PARTIAL / "progress.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="not empty"):
        prepare_output_dir(out, resume=False)


def test_output_path_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a folder"):
        prepare_output_dir(out, resume=False)
    assert out.read_text() == "keep me"
