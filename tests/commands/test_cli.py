"""The command line end to end on tiny models, and every bad input's one-line error."""

import json

import pytest
import torch
from torch import nn

from conftest import save_transformers_model, tiny_llama
from nibble.cli import main
from nibble.errors import UnsupportedArchitectureError
from nibble.models import decoder_blocks


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return save_transformers_model(tiny_llama(), tokenizer, tmp_path / "tiny")


def test_quantize_then_eval_on_a_text_file(capsys, tmp_path, model_dir, corpus_file):
    code, out, _ = run_cli(capsys, "quantize", model_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
                           "--calib", corpus_file, "--nsamples", "4", "--seqlen", "64", "--out", tmp_path / "q", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bits_per_weight"] == pytest.approx(4 + 24 / 32)
    code, out, _ = run_cli(capsys, "eval", tmp_path / "q", "--dataset", corpus_file, "--seqlen", "128", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["windows"] == len(corpus_file.read_text().encode()) // 128
    assert result["tokens"] == result["windows"] * 127 and 1 < result["ppl"] < 1000


def test_eval_with_a_rounded_head(capsys, model_dir, corpus_file):
    ppl = {}
    for head in ([], ["--head-bits", "8"], ["--head-bits", "4", "--head-group-size", "32"]):
        code, out, _ = run_cli(capsys, "eval", model_dir, "--dataset", corpus_file, "--seqlen", "128", "--json", *head)
        assert code == 0
        ppl[len(head)] = json.loads(out.strip().splitlines()[-1])["ppl"]
    assert ppl[2] != ppl[0] and ppl[2] == pytest.approx(ppl[0], rel=0.01)  # 8 bits: close to the float head
    assert ppl[4] != ppl[0] and ppl[4] == pytest.approx(ppl[0], rel=0.2)


@pytest.mark.parametrize("spec,message", [
    ("./no/such/model", "no such file or folder"),
    ("not-a-model", "unknown model"),
])
def test_bad_model_specs(capsys, spec, message):
    code, _, err = run_cli(capsys, "eval", spec)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_folder_without_model_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2 and "neither a nibble checkpoint nor a transformers model" in err


def test_unknown_dataset_is_refused(capsys, model_dir):
    code, _, err = run_cli(capsys, "eval", model_dir, "--dataset", "imagenet")
    assert code == 2 and "unknown dataset 'imagenet'" in err


def test_existing_output_folder_is_refused(capsys, tmp_path, model_dir, corpus_file):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "quantize", model_dir, "--method", "rtn", "--out", out, "--calib", corpus_file)
    assert code == 2 and "already exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_nan_weights_are_refused(capsys, tmp_path, tokenizer):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    folder = save_transformers_model(model, tokenizer, tmp_path / "bad")
    code, _, err = run_cli(capsys, "eval", folder)
    assert code == 2 and "model.layers.1.mlp.up_proj.weight contains NaN or Inf" in err


def test_truncated_checkpoint_is_refused_on_the_command_line(capsys, tmp_path, model_dir, corpus_file):
    run_cli(capsys, "quantize", model_dir, "--method", "rtn", "--group-size", "32", "--out", tmp_path / "q",
            "--calib", corpus_file)
    weights = tmp_path / "q" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "eval", tmp_path / "q")
    assert code == 2 and "truncated" in err


def test_model_without_block_list_is_unsupported():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitectureError, match="Flat has no list of decoder blocks"):
        decoder_blocks(Flat())


def test_unreachable_hub_id_fails_with_one_line_from_the_console_script():
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "nibble.cli", "eval", "example-org/no-such-model"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("nibble: error:")]
    assert len(lines) == 1 and "example-org/no-such-model" in lines[0]


def test_finetune_defaults_are_the_tune_config_defaults():
    from nibble.cli import build_parser
    from nibble.commands.finetune import build_config
    from nibble.tune import TuneConfig

    args = build_parser().parse_args(["finetune", "q", "--teacher", "t", "--out", "o"])
    assert build_config(args).to_dict() == TuneConfig().to_dict()
