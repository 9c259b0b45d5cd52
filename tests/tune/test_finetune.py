"""``nibble finetune`` end to end: output folder, resume, two gloo processes, export, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_transformers_model
from nibble.cli import main
from nibble.formats.checkpoint import read_json, save_quantized
from nibble.formats.hf_export import import_hf
from nibble.models import load_model
from nibble.tune import TuneConfig, TuneData, finetune_to_dir
from nibble.tune.distributed import spawn_local
from nibble.tune.run import TuneRun


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def dirs(tmp_path, tokenizer, teacher, capsys):
    """A teacher folder and its 3-bit RTN quantization made by ``nibble quantize``."""
    teacher_dir = save_transformers_model(teacher, tokenizer, tmp_path / "teacher")
    code, _, err = run_cli(capsys, "quantize", teacher_dir, "--method", "rtn", "--bits", "3", "--group-size", "32",
                           "--out", tmp_path / "q")
    assert code == 0, err
    return teacher_dir, tmp_path / "q"


def tune_args(corpus_file, steps=4):
    return ["--calib", corpus_file, "--nsamples", "8", "--seqlen", "32", "--holdout", "2", "--steps", steps,
            "--batch-size", "2", "--lr", "3e-4", "--tau", "0.002", "--v-lr", "0.5", "--eval-every", "2",
            "--save-every", "2", "--best-by", "kl"]


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_finetune_writes_a_nibble_model_that_loads_and_evaluates(capsys, tmp_path, dirs, corpus_file):
    teacher_dir, qdir = dirs
    code, out, err = run_cli(capsys, "finetune", qdir, "--teacher", teacher_dir, "--out", tmp_path / "ft",
                             *tune_args(corpus_file), "--teacher-cache", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["best"]["kl"] < summary["before"]["kl"]
    config, source = read_json(tmp_path / "ft" / "nibble_config.json"), read_json(qdir / "nibble_config.json")
    assert config["layers"] == source["layers"] and config["quantization"] == source["quantization"]
    assert config["finetune"]["tune"]["mode"] == "pv" and config["finetune"]["tokens_seen"] == 4 * 2 * 32
    assert not (tmp_path / "ft" / ".nibble-partial").exists()
    assert any(not torch.equal(a, weights(qdir)[k]) for k, a in weights(tmp_path / "ft").items())
    load_model(str(tmp_path / "ft"))
    code, out, _ = run_cli(capsys, "eval", tmp_path / "ft", "--dataset", corpus_file, "--seqlen", "64", "--max-windows", "4", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["ppl"] > 1


def test_resume_after_an_interruption_gives_the_uninterrupted_result(capsys, tmp_path, dirs, corpus_file,
                                                                     monkeypatch):
    teacher_dir, qdir = dirs
    args = ["finetune", qdir, "--teacher", teacher_dir, *tune_args(corpus_file, steps=6), "--mode", "ste",
            "--tau", "1", "--v-lr", "0.003"]
    assert run_cli(capsys, *args, "--out", tmp_path / "whole")[0] == 0

    original = TuneRun.save

    def save_then_crash(self, tuner, progress):
        original(self, tuner, progress)
        if progress["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(TuneRun, "save", save_then_crash)
    assert run_cli(capsys, *args, "--out", tmp_path / "cut")[0] == 130
    assert not (tmp_path / "cut" / "nibble_config.json").exists()
    monkeypatch.setattr(TuneRun, "save", original)
    assert run_cli(capsys, *args, "--out", tmp_path / "cut", "--resume")[0] == 0
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, dirs, corpus_file):
    teacher_dir, qdir = dirs
    config = TuneConfig(steps=3, batch_size=2, microbatch_size=1, lr=3e-4, tau=0.002, v_lr=0.5)
    data = TuneData(str(corpus_file), nsamples=8, seqlen=32, holdout=2)
    common = dict(eval_every=1, save_every=2, best_by="kl", progress_bar=False)
    finetune_to_dir(str(qdir), str(teacher_dir), tmp_path / "one", config, data, **common)
    spawn_local(2, finetune_to_dir, str(qdir), str(teacher_dir), tmp_path / "two", config, data,
                start_method="fork", **common)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[name], two[name]) for name in one)  # bit-exact with two microbatches
    meta = read_json(tmp_path / "two" / "nibble_config.json")["finetune"]
    assert meta["world_size"] == 2 and meta["best"]["step"] > 0
    assert meta["validation"] == read_json(tmp_path / "one" / "nibble_config.json")["finetune"]["validation"]


@pytest.mark.parametrize("extra,message", [
    (["--tau", "2"], "--tau must lie in [0, 1]"),
    (["--mode", "qat"], None),
    (["--mode", "ste", "--v-select", "gain"], "--v-select gain is for --mode pv"),
])
def test_bad_settings_are_one_line_errors(capsys, tmp_path, dirs, corpus_file, extra, message):
    teacher_dir, qdir = dirs
    if message is None:
        with pytest.raises(SystemExit):
            main(["finetune", str(qdir), "--teacher", str(teacher_dir), "--out", str(tmp_path / "x"), *extra])
        return
    code, _, err = run_cli(capsys, "finetune", qdir, "--teacher", teacher_dir, "--out", tmp_path / "x", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_float_model_or_a_busy_output_folder_is_refused(capsys, tmp_path, dirs, corpus_file):
    teacher_dir, qdir = dirs
    code, _, err = run_cli(capsys, "finetune", teacher_dir, "--teacher", teacher_dir, "--out", tmp_path / "x",
                           "--calib", corpus_file)
    assert code == 2 and "no quantized layers" in err
    code, _, err = run_cli(capsys, "finetune", qdir, "--teacher", teacher_dir, "--out", qdir, "--calib", corpus_file)
    assert code == 2 and "already exists" in err


def test_a_hessian_metric_on_a_scalar_model_is_refused_and_the_folder_stays_usable(capsys, tmp_path, dirs,
                                                                                   corpus_file):
    teacher_dir, qdir = dirs
    args = ["finetune", qdir, "--teacher", teacher_dir, *tune_args(corpus_file, steps=1), "--out", tmp_path / "ft"]
    code, _, err = run_cli(capsys, *args, "--v-metric", "hessian")
    assert code == 2 and "--v-metric hessian needs" in err and "scalar" in err
    assert run_cli(capsys, *args)[0] == 0  # the same --out, now with a valid setting


def test_a_tuned_aqlm_model_exports_like_the_model_it_came_from(capsys, tmp_path, tokenizer, teacher, corpus_file,
                                                                 make_aqlm_student):
    teacher_dir = save_transformers_model(teacher, tokenizer, tmp_path / "teacher")
    save_quantized(make_aqlm_student(teacher), tokenizer, tmp_path / "q", {"method": "aqlm"}, torch.float32)
    code, _, err = run_cli(capsys, "finetune", tmp_path / "q", "--teacher", teacher_dir, "--out", tmp_path / "ft",
                           *tune_args(corpus_file))
    assert code == 0, err
    for name in ("q", "ft"):
        code, _, err = run_cli(capsys, "export", tmp_path / name, "--out", tmp_path / f"{name}-hf")
        assert code == 0, err
    source, tuned = (read_json(tmp_path / f"{name}-hf" / "config.json")["quantization_config"] for name in ("q", "ft"))
    assert tuned == source and tuned["quant_method"] == "aqlm"
    exported, model = import_hf(tmp_path / "ft-hf"), load_model(str(tmp_path / "ft"))
    assert any(not torch.equal(a, weights(tmp_path / "q")[k]) for k, a in weights(tmp_path / "ft").items())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
