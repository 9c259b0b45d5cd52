import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from nibble.errors import DatasetError
from nibble.eval.perplexity import perplexity, windows_of


def test_perplexity_matches_a_direct_computation():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=128, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 1000 - 127, 128):
            window = ids[start : start + 128][None]
            if window.shape[1] < 128:
                break
            logits = model(input_ids=window).logits[0, :-1]
            nll += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += 127
    assert result.windows == 7 and result.tokens == count
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_windows_drop_the_tail_and_respect_max():
    ids = torch.arange(1000)
    assert windows_of(ids, 300).shape == (3, 300)
    assert windows_of(ids, 300, max_windows=2).tolist()[1][0] == 300
    with pytest.raises(DatasetError, match="fewer than one window"):
        windows_of(ids, 2048)
