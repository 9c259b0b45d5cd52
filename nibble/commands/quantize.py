"""``nibble quantize MODEL --method M --out DIR``: post-training quantization into a nibble folder."""

from __future__ import annotations

from nibble.commands.common import add_device_argument, pick_device, print_json_last
from nibble.errors import ConfigError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="quantize a model block by block into a nibble folder")
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="model spec (default: smollm2-135m)")
    parser.add_argument("--method", default="gptq", choices=["rtn", "gptq", "aqlm"])
    parser.add_argument("--out", required=True, help="output folder (must be new or empty, unless --resume)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    scalar = parser.add_argument_group("rtn / gptq")
    scalar.add_argument("--bits", type=int, default=4, help="integer bits per weight: 2, 3, 4 or 8")
    scalar.add_argument("--group-size", type=int, default=None,
                        help="inputs per scale group; -1 = per output channel (default 128; aqlm: 8)")
    scalar.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points)")
    scalar.add_argument("--act-order", action="store_true", help="gptq: visit columns by decreasing H diagonal")
    scalar.add_argument("--damp", type=float, default=0.01, help="gptq: damping as a fraction of mean diag(H)")
    aqlm = parser.add_argument_group("aqlm")
    aqlm.add_argument("--codebooks", type=int, default=2, help="aqlm: codebooks per group (M)")
    aqlm.add_argument("--bits-per-codebook", type=int, default=8, help="aqlm: bits per codebook (B)")
    aqlm.add_argument("--beam-size", type=int, default=None, help="aqlm: beam search width")
    aqlm.add_argument("--fast", action="store_true", help="aqlm: the fast preset (a little quality for time)")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calib", default="c4", help="c4, wikitext2 or a text file (default c4)")
    calib.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    calib.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    calib.add_argument("--seed", type=int, default=0)
    calib.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--offload", action="store_true", help="keep activations on the CPU between uses")
    parser.add_argument("--json", action="store_true", help="end with a JSON line summarising the run")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def build_config(args):
    """The method config object that the command-line arguments describe."""
    if args.method in ("rtn", "gptq"):
        from nibble.quantize import GPTQConfig, RTNConfig

        common = dict(bits=args.bits, group_size=128 if args.group_size is None else args.group_size,
                      symmetric=args.symmetric)
        if args.method == "rtn":
            return RTNConfig(**common)
        return GPTQConfig(**common, damp=args.damp, act_order=args.act_order)
    from nibble.quantize.aqlm import AQLMConfig

    overrides = dict(num_codebooks=args.codebooks, nbits_per_codebook=args.bits_per_codebook,
                     seed=args.seed)
    if args.group_size is not None:
        overrides["group_size"] = args.group_size
    if args.beam_size is not None:
        overrides["beam_size"] = args.beam_size
    return AQLMConfig.preset("fast" if args.fast else "default", **overrides)


def run(args) -> int:
    from nibble.models import load_model, load_tokenizer
    from nibble.quantize import CalibrationConfig, quantize_to_dir

    config = build_config(args)
    config.validate()
    if args.nsamples < 1 or args.seqlen < 2:
        raise ConfigError("--nsamples must be >= 1 and --seqlen >= 2")
    calibration = CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed, args.batch_size)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=pick_device(args.device))
    summary = quantize_to_dir(model, tokenizer, args.model, config, calibration, args.out,
                              resume=args.resume, offload=args.offload)
    size = summary["size"]
    print(f"wrote {args.out}: {size['bits_per_weight']:.3f} bits per quantized weight (codes, scales and "
          f"zeros/codebooks counted), {size['bits_per_parameter']:.3f} bits per parameter overall, "
          f"{summary['weights']['bytes'] / 2**20:.1f} MiB, {summary['seconds_this_run']:.0f} s")
    if args.json:
        print_json_last({"out": args.out, "method": config.method, **size,
                         "file_bytes": summary["weights"]["bytes"], "seconds": summary["seconds_this_run"]})
    return 0
