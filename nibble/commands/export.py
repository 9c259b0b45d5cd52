"""``nibble export DIR --format hf --out HF_DIR``: write a nibble model in the ecosystem's layout."""

from __future__ import annotations

from pathlib import Path

from nibble.errors import ConfigError, OutputExistsError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a nibble AQLM model for transformers + aqlm")
    parser.add_argument("model", help="a nibble checkpoint folder (AQLM)")
    parser.add_argument("--format", default="hf", choices=["hf"],
                        help="hf: transformers folder with quantization_config quant_method 'aqlm'")
    parser.add_argument("--out", required=True, help="new or empty output folder")
    parser.set_defaults(func=run)


def run(args) -> int:
    from nibble.formats.hf_export import aqlm_layers, export_hf
    from nibble.models import load_model, load_tokenizer

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"output folder {out} already exists and is not empty")
    model = load_model(args.model)
    if not aqlm_layers(model):
        raise ConfigError(f"{args.model} has no AQLM layers: only AQLM models export to the hf/aqlm layout")
    export_hf(model, load_tokenizer(args.model), out)
    print(f"wrote {out}: loads with transformers + the aqlm package (pip install aqlm[cpu]), or nibble")
    return 0
