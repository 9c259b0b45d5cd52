"""``nibble train``: argument parsing, the JSON last line, and bad input."""

import argparse
import json

import pytest

from nibble.commands import train as train_command
from nibble.errors import ConfigError, DatasetError

from .tasks.idx_data import synthetic_fashion


def parse(*argv):
    parser = argparse.ArgumentParser(prog="nibble")
    train_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["train", *map(str, argv)])


def test_fashion_mnist_json_last_line(tmp_path, capsys):
    folder = synthetic_fashion(tmp_path / "data", train=128, test=32)
    args = parse("--task", "fashion-mnist", "--recipe", "mxfp4", "--epochs", "1", "--seed", "3", "--data", folder,
                 "--keep", "none", "--json")
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["recipe"] == "mxfp4" and result["seed"] == 3 and result["epochs"] == 1
    assert 0 <= result["accuracy"] <= 100 and result["steps"] == 128 // 64
    assert len(result["quantized_layers"]) == 5  # --keep none: the first conv and the head too


def test_lm_json_last_line(shared_data, capsys):
    args = parse("--task", "lm", "--recipe", "ibm-fp4", "--max-steps", "2", "--eval-bytes", "2000", "--json")
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "lm" and result["steps"] == 2 and result["ppl"] > 1


def test_bad_input():
    with pytest.raises(SystemExit):
        parse("--task", "cifar", "--recipe", "fp32")
    with pytest.raises(SystemExit):
        parse("--task", "lm", "--recipe", "int2")
    args = parse("--task", "lm", "--recipe", "fp32", "--epochs", "0")
    with pytest.raises(ConfigError, match="--epochs"):
        args.func(args)
    args = parse("--task", "fashion-mnist", "--recipe", "fp32", "--data", "/no/such/folder")
    with pytest.raises(DatasetError):
        args.func(args)
