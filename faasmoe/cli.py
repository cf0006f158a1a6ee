"""The `faasmoe` command line: one argparse subcommand tree; each command adds its own parser."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, '1024' -> 1024 (as HF's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 500MB, 1048576)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _add_model_parser(subparsers: argparse._SubParsersAction) -> None:
    from faasmoe.presets import FAMILIES, PRESETS

    model = subparsers.add_parser("model", help="model checkpoints: init writes a random one")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    presets = "; ".join(f"{family}: {', '.join(PRESETS[family])}" for family in FAMILIES)
    init = actions.add_parser(
        "init",
        help="write a random MoE checkpoint (HF format, with tokenizer) into OUT",
        description="Write a complete random checkpoint of an MoE family in the real Hugging Face "
        "on-disk format: config.json, generation_config.json, tokenizer files and safetensors "
        "weights (sharded with model.safetensors.index.json when larger than --max-shard-size). "
        "The same arguments always write the same weights.",
    )
    init.add_argument("out", metavar="OUT", type=Path, help="directory to write (created if missing)")
    init.add_argument("--family", required=True, choices=FAMILIES, help="model family (the HF model_type)")
    init.add_argument("--preset", default="tiny",
                      help=f"model shape; 'tiny' builds in a second, the others have the real dimensions "
                      f"({presets}); default: tiny")
    init.add_argument("--layers", type=int, default=None,
                      help="keep only the first N layers (so a real-shaped preset fits a machine); default: all")
    init.add_argument("--seed", type=int, default=0, help="random seed of the weights; default: 0")
    init.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="weight dtype; default: the preset's (tiny float32, real shapes bfloat16)")
    init.add_argument("--router-skew", type=float, default=0.0, metavar="S",
                      help="Zipf exponent of expert popularity per MoE layer: the expert of popularity rank r "
                      "gets a share of the routed tokens proportional to r^-S, with a different popular set in "
                      "every layer (0: random routers, about uniform; 1: the busiest expert takes several times "
                      "the mean load). Trained models are skewed; random ones are not. Default: 0")
    init.add_argument("--max-shard-size", type=parse_size, default=2 * 1024**3, metavar="SIZE",
                      help="largest safetensors file before sharding (e.g. 2GiB, 500MB); default: 2GiB")
    init.add_argument("--expert-format", choices=("per_expert", "fused"), default="per_expert",
                      help="per_expert: mlp.experts.E.gate_proj.weight ... as the published checkpoints; "
                      "fused: mlp.experts.gate_up_proj [E,2I,H] and down_proj [E,H,I] as transformers 5 "
                      "saves them. Default: per_expert")
    init.add_argument("--quiet", action="store_true", help="no progress bar")
    init.set_defaults(handler=_model_init)


def _model_init(args: argparse.Namespace) -> int:
    from faasmoe.model_init import init_checkpoint

    start = time.perf_counter()
    out = init_checkpoint(
        args.out, args.family, preset=args.preset, layers=args.layers, seed=args.seed, dtype=args.dtype,
        router_skew=args.router_skew, max_shard_bytes=args.max_shard_size, progress=not args.quiet,
        expert_format=args.expert_format,
    )
    weights = sorted(out.glob("model*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    print(f"wrote {args.family} ({args.preset}) checkpoint to {out}: {_format_bytes(size)} in "
          f"{len(weights)} safetensors file(s), {time.perf_counter() - start:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faasmoe", description="Serverless Mixture-of-Experts serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"faasmoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
