"""Secrets on the command line: `--X-file PATH` or `$FAASMOE_X`, and `--X` only with a warning.

Every user of a machine can read every process's argv (`ps`, /proc/PID/cmdline), so a key given
as `--api-key K` is no secret there. A file (mode 0600, a mounted secret) or the environment is.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_warned = False


def add_secret_arguments(parser: argparse.ArgumentParser, flag: str, env: str | None, what: str,
                         default_help: str = "") -> None:
    """`--FLAG VALUE` (discouraged: visible in `ps`) and `--FLAG-file PATH` for one secret."""
    source = f"--{flag}-file or ${env}" if env else f"--{flag}-file"
    parser.add_argument(f"--{flag}", default=None, metavar="VALUE",
                        help=f"{what}{default_help}; visible to other users in `ps`: prefer {source}")
    parser.add_argument(f"--{flag}-file", type=Path, default=None, metavar="PATH",
                        help=f"read --{flag} from PATH (its first line)")


def resolve_secret(args: argparse.Namespace, flag: str, env: str | None) -> str | None:
    """The secret from --FLAG-file, else --FLAG (with a warning), else $ENV; None when none is given."""
    dest = flag.replace("-", "_")
    value, path = getattr(args, dest), getattr(args, f"{dest}_file")
    if value is not None and path is not None:
        raise ValueError(f"give --{flag} or --{flag}-file, not both")
    if path is not None:
        return read_secret_file(path, f"--{flag}-file")
    if value is not None:
        _warn_on_argv(flag, env)
        return value
    return (os.environ.get(env) or None) if env else None


def read_secret_file(path: Path, where: str) -> str:
    try:
        lines = path.expanduser().read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{where} {path}: cannot read it: {exc.strerror or exc}") from None
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ValueError(f"{where} {path}: the file is empty; put the secret on its first line")
    return secret


def _warn_on_argv(flag: str, env: str | None) -> None:
    global _warned
    if _warned:  # once a process: the advice is the same for every secret flag
        return
    _warned = True
    instead = f"--{flag}-file or ${env}" if env else f"--{flag}-file"
    print(f"faasmoe: warning: --{flag} puts a secret on the command line, where every user of this machine "
          f"can read it (ps, /proc/PID/cmdline); use {instead} instead", file=sys.stderr, flush=True)
