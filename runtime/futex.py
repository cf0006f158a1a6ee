"""Wait on a 32-bit word in memory shared between processes until another process changes it and wakes
the waiters (Linux futex, through libc's `syscall`; ctypes releases the GIL while it waits).

The call ring's synchronous path uses it: a frontend thread waits on a slot's state word, the worker
wakes it after writing the result, one kernel wakeup and no event loop on the way. Where there is no
futex (not Linux, an unknown architecture) `available()` is False and the ring keeps its pipes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import sys

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # not the _PRIVATE variants: the word is shared across processes
_WAKE_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_syscall():
    if not sys.platform.startswith("linux") or _SYS_FUTEX is None:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                        ctypes.c_void_p, ctypes.c_int]
    return syscall


_syscall = _load_syscall()


def available() -> bool:
    return _syscall is not None


def wait(address: int, expected: int, timeout_s: float) -> None:
    """Sleep while the word at `address` holds `expected`, at most `timeout_s`. Returns at once when it
    already differs; may also return early (a signal, a spurious wakeup): the caller checks the word."""
    spec = _Timespec(int(timeout_s), int((timeout_s % 1.0) * 1e9))
    if _syscall(_SYS_FUTEX, address, _FUTEX_WAIT, expected, ctypes.byref(spec), None, 0) < 0:
        code = ctypes.get_errno()
        if code not in (errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT):
            raise OSError(code, f"futex wait: {errno.errorcode.get(code, code)}")


def wake(address: int) -> None:
    """Wake every process and thread waiting on the word at `address` (none: a cheap no-op)."""
    _syscall(_SYS_FUTEX, address, _FUTEX_WAKE, _WAKE_ALL, None, None, 0)
