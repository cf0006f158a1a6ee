"""The `faasmoe` command line: one argparse subcommand tree; each command adds its own parser."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from faasmoe.cli.cluster import add_scheduler_parser, add_serve_parser, add_worker_parser
    from faasmoe.cli.model import add_generate_parser, add_model_parser
    from faasmoe.cli.tenants import add_tenant_parser, add_usage_parser

    parser = argparse.ArgumentParser(prog="faasmoe", description="Serverless Mixture-of-Experts serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_model_parser(subparsers)
    add_generate_parser(subparsers)
    add_scheduler_parser(subparsers)
    add_worker_parser(subparsers)
    add_tenant_parser(subparsers)
    add_usage_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"faasmoe: error: {describe(exc)}", file=sys.stderr)
        return 2


def describe(exc: BaseException) -> str:
    """An exception as one line that is never empty (str(TimeoutError()) is "")."""
    text = str(exc).strip()
    if not text and exc.__cause__ is not None:
        text = describe(exc.__cause__)
    return text or f"{type(exc).__name__} (no details)"

