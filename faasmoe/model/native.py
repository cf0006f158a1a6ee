"""Small C kernels torch does not ship, built on first use with the machine's C compiler and called
through ctypes (which lets go of the GIL for the call).

Each source in `csrc/` is compiled with -O3 -march=native into the user's cache
(`$XDG_CACHE_HOME/faasmoe/kernels`, else `~/.cache/...`), named by a digest of the source, the flags and the
CPU, so a build made for another CPU or an older source is never loaded. Where no compiler is found or the
build fails, `kernel` returns None, says why once in the log, and the caller keeps its torch path;
`FAASMOE_NATIVE=0` does the same on purpose.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE_ENV = "FAASMOE_NATIVE"  # "0": never build or load a native kernel
SOURCES = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC")
_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1") != "0"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "faasmoe" / "kernels"


def kernel(source: str, function: str, argtypes: list, restype=ctypes.c_int):
    """`function` of csrc/`source`.c as a ctypes function, or None where it cannot be built here."""
    if not enabled():
        return None
    with _lock:
        if source not in _libraries:
            _libraries[source] = _build(source)
        library = _libraries[source]
    if library is None:
        return None
    fn = getattr(library, function)  # ctypes keeps the function object on the library
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn


def _cpu() -> str:
    """What -march=native compiles for: the machine and its CPU's feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _build(source: str) -> ctypes.CDLL | None:
    path = SOURCES / f"{source}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc, gcc or $CC): the %s kernel is not built, torch's path serves", source)
        return None
    key = hashlib.sha256(path.read_bytes() + " ".join(FLAGS).encode() + _cpu().encode()).hexdigest()[:16]
    out = cache_dir() / f"{source}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # others may build it too
        try:
            built = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(path)], capture_output=True, text=True,
                                   timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("building the %s kernel failed (%r): torch's path serves", source, exc)
            return None
        if built.returncode != 0:
            log.warning("building the %s kernel failed: torch's path serves\n%s", source, built.stderr.strip()[-2000:])
            partial.unlink(missing_ok=True)
            return None
        os.replace(partial, out)
    try:
        return ctypes.CDLL(str(out))
    except OSError as exc:
        log.warning("loading the %s kernel failed (%s): torch's path serves", source, exc)
        return None
