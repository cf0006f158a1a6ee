"""Which bytes of a file are in the page cache: proof that a read touched only what it should."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages of a freshly written file cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache_bytes(path: Path) -> int:
    """Bytes of `path` resident in the page cache (mincore over a fresh mapping)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page = os.sysconf("SC_PAGE_SIZE")
    pages = (size + page - 1) // page
    vector = (ctypes.c_ubyte * pages)()
    buffer = (ctypes.c_char * size).from_buffer(mapping)
    try:
        if _libc.mincore(ctypes.addressof(buffer), size, vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
    finally:
        del buffer
        mapping.close()
    return sum(v & 1 for v in vector) * page


def readahead_bytes(path: Path) -> int:
    """The most the kernel reads past a read of `path` on its own (its device's read_ahead_kb)."""
    st = path.stat()
    window = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    try:
        return int(window.read_text()) * 1024
    except (OSError, ValueError):
        return 128 * 1024  # the kernel's default window
