"""``nibble generate MODEL --prompt TEXT`` and ``nibble chat MODEL``: decoding with the lean runtime."""

from __future__ import annotations

import sys

from nibble.commands.common import (add_device_argument, add_head_arguments, apply_head_arguments, pick_device,
                                    print_json_last)


def add_parser(subparsers) -> None:
    """Add the ``generate`` and ``chat`` subcommands."""
    generate = subparsers.add_parser("generate", help="continue a prompt (greedy or sampled)")
    generate.add_argument("model", help="built-in name, GGUF file, transformers or nibble folder, or hub id")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--chat-template", action="store_true",
                          help="wrap the prompt as one user turn with the tokenizer's chat template")
    generate.add_argument("--json", action="store_true",
                          help="end with a JSON line: tokens_per_s (decode), prompt_tokens_per_s, ...")
    _add_common(generate)
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="talk to an instruct model (one user turn per stdin line)")
    chat.add_argument("model", help="built-in name, GGUF file, transformers or nibble folder, or hub id")
    chat.add_argument("--system", default=None, help="system message placed before the first turn")
    _add_common(chat)
    chat.set_defaults(func=run_chat)


def _add_common(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--max-len", type=int, default=2048, help="KV cache length in tokens (default 2048)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    add_head_arguments(parser)
    parser.add_argument("--backend", default="auto", choices=("auto", "cpp", "torch", "graph"),
                        help="decode step: fused C++ (CPU, float32), eager torch, CUDA graphs (GPU), "
                             "or auto (default: graph on a GPU, else C++ when it builds)")
    parser.add_argument("--full-head", action="store_true",
                        help="greedy C++ steps compute the whole float head instead of screening it with an "
                             "8-bit copy (same tokens; the screen reads a quarter of the head's bytes)")
    add_device_argument(parser)


def run_generate(args) -> int:
    from nibble.runtime import TextStream, default_stop_tokens, generate

    model, tokenizer, runtime, sampling = _setup(args)
    prompt = _prompt_ids(tokenizer, args.prompt, args.chat_template)
    stream = TextStream(tokenizer)
    result = generate(runtime, [prompt], args.max_new_tokens, sampling, default_stop_tokens(tokenizer, model),
                      on_token=lambda _row, token: _write(stream.push(token)))
    _write(stream.flush() + "\n")
    if args.json:
        print_json_last({
            "model": args.model, "backend": runtime.backend, "prompt_tokens": result.prompt_tokens,
            "new_tokens": result.new_tokens, "tokens_per_s": round(result.tokens_per_s, 3),
            "prompt_tokens_per_s": round(result.prompt_tokens_per_s, 3),
            "text": tokenizer.decode(result.tokens[0], skip_special_tokens=True),
        })
    return 0


def run_chat(args) -> int:
    from nibble.runtime import ChatSession, TextStream, default_stop_tokens

    model, tokenizer, runtime, sampling = _setup(args)
    session = ChatSession(runtime, tokenizer, sampling, args.system, default_stop_tokens(tokenizer, model))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            _write("> ")
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        stream = TextStream(tokenizer)
        session.reply(text, args.max_new_tokens, on_token=lambda _row, token: _write(stream.push(token)))
        _write(stream.flush() + "\n")
    return 0


def _setup(args):
    import torch

    from nibble.models import load_model, load_tokenizer
    from nibble.runtime import SamplingConfig, build_runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=pick_device(args.device))
    apply_head_arguments(model, args)
    runtime = build_runtime(model, max_len=args.max_len, backend=args.backend, threads=args.threads,
                            screen_head=not args.full_head)
    return model, tokenizer, runtime, sampling


def _prompt_ids(tokenizer, text: str, chat_template: bool) -> list[int]:
    if chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
    return tokenizer(text)["input_ids"]


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
