"""End-to-end decode speed on the built-in SmolLM2-135M: nibble vs transformers vs llama.cpp.

Every engine generates the same number of greedy tokens after the same prompt, batch 1, with the
same thread count; the engines take turns (interleaved repeats) so that load from other processes
hits all of them alike, and the table shows medians and the ratio to transformers' ``generate`` on
the fp32 model measured in the same run.

    NIBBLE_DATA=../shared/data python benchmarks/decode.py [--tokens 64] [--repeats 5] [--threads 2,1]
        [--aqlm DIR [--head-bits 8 4]] [--torch-backend] [--no-llama-cpp] [--device cuda]

Decode tok/s counts the tokens after the first (each costs one forward of one token); prompt tok/s
is prompt length / time to the first token. A run stops early after ``--max-seconds`` of decoding
(transformers and llama.cpp; rates are over the tokens made). Every engine runs at each thread count of
``--threads``; the ratio compares with transformers at the same thread count. ``--aqlm DIR`` adds
a nibble checkpoint (e.g. AQLM 2x8). ``NIBBLE_DATA`` is needed once, to make the IQ2_XXS file.
With ``--device cuda`` the models run in float16 on the GPU (nibble's default backend there replays
CUDA graphs; ``--torch-backend`` adds the eager step) and llama.cpp's CPU rows are left out.
``--random-weights`` uses a randomly initialised model of SmolLM2-135M's shape and a fixed prompt
of 24 token ids instead of the built-in model (for machines without it, e.g. a lent GPU): speed
depends on the shapes only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = ("Here is a short story about a lighthouse keeper who finds a message in a bottle on a stormy "
          "night. It begins:")


@dataclass
class Engine:
    """One row of the table: ``run(prompt_ids, tokens) -> (prefill_s, decode_s, decode_steps)``."""

    name: str
    format: str
    threads: int
    run: Callable[[list[int], int], tuple[float, float, int]]
    decode: list[float] = field(default_factory=list)
    prompt: list[float] = field(default_factory=list)


def transformers_engine(model, threads: int, max_seconds: float) -> Engine:
    def generate(ids: torch.Tensor, tokens: int) -> tuple[float, int]:
        begin = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 use_cache=True, pad_token_id=0, max_time=max_seconds)
        return time.perf_counter() - begin, out.shape[1] - ids.shape[1]

    def run(prompt: list[int], tokens: int):
        ids = torch.tensor([prompt], device=model.device)
        first, _ = generate(ids, 1)
        total, produced = generate(ids, tokens)
        return first, total - first, produced - 1
    return Engine("transformers generate", dtype_label(model), threads, run)


def dtype_label(model) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[next(model.parameters()).dtype]


def nibble_engine(model, label: str, threads: int, backend: str = "auto", screen_head: bool = True) -> Engine:
    from nibble.runtime import build_runtime, generate

    runtime = build_runtime(model, max_len=512, backend=backend, threads=threads, screen_head=screen_head)
    if runtime.backend == "cpp" and not screen_head and runtime.step.torch_step.lm_head.is_dense:
        label += ", full head"

    def run(prompt: list[int], tokens: int):
        result = generate(runtime, [prompt], tokens)
        return result.prefill_seconds, result.decode_seconds, result.decode_steps
    return Engine(f"nibble ({runtime.backend})", label, threads, run)


def llama_cpp_engine(path: Path, label: str, threads: int, max_seconds: float) -> Engine:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def next_token() -> int:
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def run(prompt: list[int], tokens: int):
        llm.reset()
        begin = time.perf_counter()
        llm.eval(prompt)
        token = next_token()
        prefill = time.perf_counter() - begin
        begin = time.perf_counter()
        steps = 0
        while steps < tokens - 1 and time.perf_counter() - begin < max_seconds:
            llm.eval([token])
            token = next_token()
            steps += 1
        return prefill, time.perf_counter() - begin, steps
    return Engine("llama.cpp", label, threads, run)


def build_engines(args) -> tuple[list[Engine], list[int]]:
    from nibble.models import load_model, load_tokenizer
    from nibble.models.loading import resolve_spec

    gpu = args.device != "cpu"
    dtype = torch.float16 if gpu else torch.float32

    if args.random_weights and args.aqlm:
        raise SystemExit("--random-weights runs the float model only (no --aqlm)")

    def load(spec: str):
        if args.random_weights:  # every model is the same random SmolLM2-shaped Llama
            return random_smollm2(dtype, args.device)
        return load_model(spec, dtype=dtype, device=args.device)

    prompt = list(range(100, 124))
    model = load("smollm2-135m")
    skip_llama_cpp = args.no_llama_cpp or gpu or args.random_weights
    if not args.random_weights:
        tokenizer = load_tokenizer("smollm2-135m")
        prompt = tokenizer(PROMPT)["input_ids"]
    paths = None if skip_llama_cpp else llama_cpp_files(model, tokenizer, resolve_spec("smollm2-135m"))
    torch_model = load("smollm2-135m") if args.torch_backend else None
    aqlm_model = load(args.aqlm) if args.aqlm else None
    rounded_heads = {}  # bits -> the AQLM model with its head rounded to that many bits
    if args.aqlm:
        from nibble.runtime.head import quantize_head

        rounded_heads = {bits: quantize_head(load(args.aqlm), bits) for bits in args.head_bits}
    engines = []
    label = dtype_label(model)
    for threads in args.threads:
        engines += [transformers_engine(model, threads, args.max_seconds), nibble_engine(model, label, threads)]
        if args.full_head and not gpu:
            engines.append(nibble_engine(load("smollm2-135m"), label, threads, screen_head=False))
        if torch_model is not None:
            engines.append(nibble_engine(torch_model, label, threads, backend="torch"))
        if aqlm_model is not None:
            engines.append(nibble_engine(aqlm_model, Path(args.aqlm).name, threads))
            if args.full_head and not gpu:
                engines.append(nibble_engine(load(args.aqlm), Path(args.aqlm).name, threads, screen_head=False))
            if args.torch_backend:
                engines.append(nibble_engine(load(args.aqlm), Path(args.aqlm).name, threads, backend="torch"))
        for bits, rounded in rounded_heads.items():
            engines.append(nibble_engine(rounded, f"{Path(args.aqlm).name} + int{bits} head", threads))
        for name, path in (paths or {}).items():
            engines.append(llama_cpp_engine(path, name, threads, args.max_seconds))
    return engines, prompt


def random_smollm2(dtype: torch.dtype, device: str):
    """A randomly initialised Llama with SmolLM2-135M's shape (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def llama_cpp_files(model, tokenizer, spec) -> dict[str, Path] | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed: llama.cpp rows skipped", file=sys.stderr)
        return None
    from llamacpp_models import ensure_ggufs

    return ensure_ggufs(Path(spec.location) / spec.gguf_file, model, tokenizer)


def measure(engines: list[Engine], prompt: list[int], tokens: int, repeats: int) -> None:
    for engine in engines:  # warm-up: first-call allocations, lazy builds, page faults
        torch.set_num_threads(engine.threads)
        engine.run(prompt, 4)
    for _ in range(repeats):
        for engine in engines:
            torch.set_num_threads(engine.threads)
            prefill, decode, steps = engine.run(prompt, tokens)
            engine.decode.append(steps / decode)
            engine.prompt.append(len(prompt) / prefill)


def read_bandwidth(threads: int, megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s of ``torch.sum`` over a float32 tensor far larger than the caches: the rate at which
    this machine streams weights, which bounds decode speed for a model of a given size."""
    torch.set_num_threads(threads)
    data = torch.ones(megabytes * 2 ** 18)
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - begin)
    return data.numel() * 4 / best / 1e9


def table(engines: list[Engine]) -> str:
    baselines = {e.threads: statistics.median(e.decode) for e in engines if e.name.startswith("transformers")}
    lines = ["| engine | format | threads | decode tok/s | prompt tok/s | decode vs transformers |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for engine in engines:
        decode = statistics.median(engine.decode)
        lines.append(f"| {engine.name} | {engine.format} | {engine.threads} | {decode:.1f} "
                     f"| {statistics.median(engine.prompt):.1f} | {decode / baselines[engine.threads]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per engine (default 5)")
    parser.add_argument("--threads", type=lambda text: [int(t) for t in text.split(",")], default=[2],
                        help="comma-separated thread counts, each for every engine (default 2)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="stop a run's decoding after this long (slow engines on a busy machine)")
    parser.add_argument("--aqlm", default=None, help="nibble checkpoint folder to add (e.g. AQLM 2x8)")
    parser.add_argument("--head-bits", type=int, nargs="*", default=[], choices=(8, 4),
                        help="also run the --aqlm model with its head rounded to each of these bit widths "
                             "(nibble.runtime.head, default group sizes)")
    parser.add_argument("--torch-backend", action="store_true", help="add nibble's eager-torch backend row")
    parser.add_argument("--full-head", action="store_true",
                        help="add rows of nibble's C++ step computing the whole float head (no 8-bit screen)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp rows")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: float16 models on the GPU")
    parser.add_argument("--random-weights", action="store_true",
                        help="a random model of SmolLM2-135M's shape instead of the built-in one")
    args = parser.parse_args(argv)
    engines, prompt = build_engines(args)
    measure(engines, prompt, args.tokens, args.repeats)
    print(f"batch 1, prompt {len(prompt)} tokens, {args.tokens} new tokens, greedy, "
          f"median of {args.repeats} interleaved runs")
    print(table(engines))
    if args.device != "cpu":
        print(f"device: {torch.cuda.get_device_name()}")
        return 0
    print("memory read bandwidth (torch.sum over 512 MB, best of 5): "
          + ", ".join(f"{read_bandwidth(t):.1f} GB/s at {t} thread(s)" for t in args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
