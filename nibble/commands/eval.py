"""``nibble eval MODEL``: perplexity with the standard protocol."""

from __future__ import annotations

from nibble.commands.common import (add_device_argument, add_head_arguments, apply_head_arguments, pick_device,
                                    print_json_last)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity on WikiText-2, C4 or a text file")
    parser.add_argument("model", help="built-in name, GGUF file, transformers or nibble folder, or hub id")
    parser.add_argument("--dataset", default="wikitext2", help="wikitext2, c4 or a path to a text file")
    parser.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--json", action="store_true", help="end with a JSON line: ppl, windows, tokens, ...")
    add_head_arguments(parser)
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from nibble.eval.perplexity import perplexity_on_dataset
    from nibble.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=pick_device(args.device))
    apply_head_arguments(model, args)
    result = perplexity_on_dataset(model, tokenizer, args.dataset, args.seqlen, args.max_windows)
    print(f"{args.dataset}: perplexity {result.ppl:.4f} over {result.windows} windows "
          f"({result.tokens} predicted tokens, seqlen {result.seqlen})")
    if args.json:
        print_json_last({**result.to_dict(), "model": args.model})
    return 0
