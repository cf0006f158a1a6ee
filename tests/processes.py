"""Real processes for end-to-end tests: started on free loopback ports, always stopped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process whose output is collected in the background, for assertions and waits."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise TimeoutError(f"{pattern!r} not seen from {self.args[:4]}; exit={self.proc.poll()}\n{self.output}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def faasmoe(*args: str, env: dict[str, str] | None = None) -> Process:
    return Process([sys.executable, "-m", "faasmoe.cli", *args], env)


def serving(port: int, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> Process:
    """`faasmoe serve ARGS` listening on `port`, once it says it serves; `.url` is its base URL.
    Stopped again when it does not come up in time, so a failed fixture leaves no process behind."""
    proc = faasmoe("serve", *args, env=env)
    try:
        proc.wait_for("faasmoe serving", timeout=timeout)
    except TimeoutError:
        proc.stop()
        raise
    proc.url = f"http://127.0.0.1:{port}"
    return proc
