"""Byte sizes as people write them on command lines: 2GiB, 500MB, 1048576."""

from __future__ import annotations

import argparse
import re

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, '1024' -> 1024 (as HF's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 500MB, 1048576)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_size_or_zero(text: str) -> int:
    """parse_size, where 0 is allowed and means "none" (a host cache or quota switched off)."""
    return 0 if text.strip() in ("0", "0B", "0b") else parse_size(text)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
