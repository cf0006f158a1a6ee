"""The `faasmoe` command line: one argparse subcommand tree; each command adds its own parser."""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import logging
import sys

_OPTIONS_SEEN = "_faasmoe_options_seen"  # namespace attribute: the flags of every parser on the command's path


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, with a "did you mean" for a mistyped flag of the subcommand it was meant for."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # A subcommand's parser runs inside its parent's and hands its attributes up: collect all flags.
        seen = getattr(namespace, _OPTIONS_SEEN, set()) | {o for o in self._option_string_actions if o.startswith("--")}
        setattr(namespace, _OPTIONS_SEEN, seen)
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        seen = getattr(namespace, _OPTIONS_SEEN, set())
        if hasattr(namespace, _OPTIONS_SEEN):
            delattr(namespace, _OPTIONS_SEEN)
        if extras:
            hints = []
            for arg in extras:
                near = difflib.get_close_matches(arg.split("=", 1)[0], sorted(seen), n=1) if arg.startswith("--") else []
                hints.append(f"{arg} (did you mean {near[0]}?)" if near else arg)
            self.error(f"unrecognized arguments: {' '.join(hints)}")
        return namespace


def version() -> str:
    try:
        return importlib.metadata.version("faasmoe")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    from faasmoe.cli.cluster import add_scheduler_parser, add_serve_parser, add_worker_parser
    from faasmoe.cli.model import add_generate_parser, add_model_parser
    from faasmoe.cli.tenants import add_tenant_parser, add_usage_parser

    parser = ArgumentParser(prog="faasmoe", description="Serverless Mixture-of-Experts serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"faasmoe {version()}")
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

