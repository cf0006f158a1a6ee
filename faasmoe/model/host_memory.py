"""Giving freed host memory back to the OS.

glibc keeps freed blocks of up to its (adaptive, up to 32 MiB) mmap threshold in its arenas, so
expert weights and trunks that leave a process would otherwise stay in its RSS; `malloc_trim`
returns those pages. On other libcs this is a no-op. Used where weights leave for good: a worker's
expired blocks, an idle whole model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl and others have no such symbol
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def return_free_memory() -> bool:
    """Hand the allocator's free pages back to the OS (glibc); False where the libc cannot."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
