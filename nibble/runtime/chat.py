"""A multi-turn conversation that re-uses the KV cache for the part of the transcript already fed."""

from __future__ import annotations

from nibble.runtime.engine import DecodeRuntime
from nibble.runtime.generate import GenerationResult, TokenCallback, generate
from nibble.runtime.sampling import SamplingConfig


class ChatSession:
    """Keeps the messages and the token ids in the cache; each turn feeds only the new suffix."""

    def __init__(self, runtime: DecodeRuntime, tokenizer, sampling: SamplingConfig = SamplingConfig(),
                 system: str | None = None, stop_tokens: set[int] | None = None):
        if runtime.batch_size != 1:
            raise ValueError("a chat session needs a runtime of batch size 1")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use `nibble generate` instead")
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.fed: list[int] = []
        self.stop_tokens = stop_tokens if stop_tokens is not None else default_stop_tokens(tokenizer)
        runtime.start()

    def reply(self, text: str, max_new_tokens: int, on_token: TokenCallback | None = None) -> str:
        """Add the user's ``text``, generate the assistant's answer and return it."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._template_ids()
        reused = self._reusable_prefix(prompt)
        self.runtime.rewind(reused)
        result = generate(self.runtime, [prompt[reused:]], max_new_tokens, self.sampling, self.stop_tokens,
                          on_token, continue_cache=True)
        self.fed = prompt + result.tokens[0][:-1]  # the last token was chosen but not fed
        self.last_result: GenerationResult = result
        answer = self.tokenizer.decode(result.tokens[0], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _template_ids(self) -> list[int]:
        ids = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def _reusable_prefix(self, prompt: list[int]) -> int:
        """How many leading tokens of ``prompt`` are in the cache already (at least one is left to feed)."""
        common = 0
        for cached, new in zip(self.fed, prompt):
            if cached != new:
                break
            common += 1
        return min(common, len(prompt) - 1, self.runtime.cache.length)


def default_stop_tokens(tokenizer, model=None) -> set[int]:
    """End-of-sequence ids of the tokenizer and, if given, of the model's generation config."""
    stops: set[int] = set()
    for source in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            stops.add(value)
        elif isinstance(value, (list, tuple)):
            stops.update(int(v) for v in value)
    return stops
