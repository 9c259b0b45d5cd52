"""Text corpora (WikiText-2, C4, local files) and seeded calibration sampling."""

from nibble.data.corpus import load_text, tokenize_corpus
from nibble.data.calibration import sample_windows, split_windows

__all__ = ["load_text", "tokenize_corpus", "sample_windows", "split_windows"]
