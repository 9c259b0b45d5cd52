"""Named corpora and local text files.

With ``NIBBLE_DATA`` pointing at a folder laid out like the hub copies
(``wikitext-2-raw-v1/test-*.parquet``, ``c4/en/c4-*.json.gz``) the files are read from there;
otherwise the ``datasets`` hub loaders are used.

C4 splits: nibble uses C4 both for calibration and as a second perplexity set. To keep the two
disjoint on the 1,000-document local sample, the ``validation`` split (perplexity) is the first
half of the documents and the ``train`` split (calibration) the second half. From the hub,
``train`` is the first training shard and ``validation`` the first validation shard.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from nibble.errors import DatasetError

NAMED_SETS = ("wikitext2", "c4")
WIKITEXT_SEPARATOR = "\n\n"
C4_SEPARATOR = "\n\n"


def data_root() -> Path | None:
    """The local data folder named by ``NIBBLE_DATA``, or None to use the hub."""
    root = os.environ.get("NIBBLE_DATA")
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"NIBBLE_DATA={root!r} is not a folder")
    return path


def load_text(name: str, split: str = "test") -> str:
    """Return a corpus as one string: ``wikitext2``, ``c4`` or a path to a UTF-8 text file.

    ``split`` is ``test`` (perplexity) or ``train`` (calibration); for ``c4`` ``test`` means the
    validation documents.
    """
    if name == "wikitext2":
        return _wikitext2(split)
    if name == "c4":
        return C4_SEPARATOR.join(_c4_documents("train" if split == "train" else "validation"))
    path = Path(name).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path} is not UTF-8 text: {exc}") from None
    raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(NAMED_SETS)} or a path to a text file")


def _wikitext2(split: str) -> str:
    hub_split = "test" if split == "test" else "train"
    root = data_root()
    if root is None:
        return WIKITEXT_SEPARATOR.join(_hub_rows("wikitext", "wikitext-2-raw-v1", hub_split))
    folder = root / "wikitext-2-raw-v1"
    files = sorted(folder.glob(f"{hub_split}-*.parquet"))
    if not files:
        raise DatasetError(f"no WikiText-2 {hub_split} parquet files under {folder}")
    import pyarrow.parquet as pq

    rows: list[str] = []
    for file in files:
        rows.extend(pq.read_table(file, columns=["text"]).column("text").to_pylist())
    return WIKITEXT_SEPARATOR.join(rows)


def _c4_documents(split: str) -> list[str]:
    root = data_root()
    if root is None:
        shard = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}[split]
        return _hub_rows("allenai/c4", None, "train", data_files={"train": shard})
    files = sorted((root / "c4" / "en").glob("c4-*.json.gz"))
    if not files:
        raise DatasetError(f"no C4 json.gz files under {root / 'c4' / 'en'}")
    docs = _read_json_lines(tuple(files))
    half = len(docs) // 2
    return docs[:half] if split == "validation" else docs[half:]


@lru_cache(maxsize=4)
def _read_json_lines(files: tuple[Path, ...]) -> list[str]:
    docs: list[str] = []
    for file in files:
        try:
            with gzip.open(file, "rt", encoding="utf-8") as handle:
                docs.extend(json.loads(line)["text"] for line in handle if line.strip())
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise DatasetError(f"cannot read C4 file {file}: {exc}") from None
    return docs


def _hub_rows(path: str, config: str | None, split: str, **kwargs) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            "NIBBLE_DATA is not set and the 'datasets' package is missing: "
            "set NIBBLE_DATA to a local data folder or `pip install nibble[hub]`"
        ) from None
    try:
        return list(datasets.load_dataset(path, config, split=split, **kwargs)["text"])
    except Exception as exc:  # network, auth, missing files: all surface as one line
        raise DatasetError(f"cannot load {path} from the hub: {exc}") from None


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once; returns a 1-D LongTensor of token ids (no special tokens)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() == 0:
        raise DatasetError("the corpus tokenized to zero tokens")
    return ids
