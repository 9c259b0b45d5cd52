"""Turning a growing list of token ids into text pieces that can be printed as they come."""

from __future__ import annotations

from typing import Callable


class TextStream:
    """Decodes tokens incrementally; ``push`` returns the newly completed text (maybe empty).

    Text is held back while it ends in an incomplete UTF-8 sequence (shown as U+FFFD).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed:], len(text)
        return piece

    def flush(self) -> str:
        text = self._decode()
        piece, self.printed = text[self.printed:], len(text)
        return piece

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)


def printer(write: Callable[[str], object], flush: Callable[[], object]) -> Callable[[str], None]:
    """A callback that writes text pieces and flushes immediately (for streaming to a terminal)."""
    def emit(piece: str) -> None:
        if piece:
            write(piece)
            flush()
    return emit
