"""CPU % and RSS of every process of a setup, sampled from a thread; GPU memory through pynvml.

A setup is a few root processes in named groups (a tenant's frontend, the worker pool...); each
sample walks every root's whole process tree again, so workers a scheduler spawns or restarts
are counted from the moment they exist. CPU % is psutil's per-process share of one core since
the previous sample (200% = two cores busy), summed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class Sample:
    """One moment: wall time, RSS bytes and CPU % per group, GPU bytes (None off CUDA), and the
    whole machine's CPU % (this benchmark's client and anything else running count there too)."""

    t: float
    rss: dict[str, int]
    cpu: dict[str, float]
    gpu_bytes: int | None = None
    machine_cpu: float = 0.0

    @property
    def rss_total(self) -> int:
        return sum(self.rss.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())


class GpuMemory:
    """Device memory used by a set of pids (NVML's per-process accounting), or the growth of the
    device's used memory since start where the pids are not visible (containers)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.idle_used = self._device_used()
        self.mode = "per-process"

    def _device_used(self) -> int:
        return sum(self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)

    def used_by(self, pids: set[int]) -> int:
        total, seen = 0, False
        for h in self.handles:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                if proc.pid in pids:
                    seen = True
                    total += proc.usedGpuMemory or 0
        if seen:
            return total
        self.mode = "device used minus idle"
        return max(0, self._device_used() - self.idle_used)

    @staticmethod
    def open() -> GpuMemory | None:
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            return GpuMemory()
        except Exception:  # no NVML here
            return None


@dataclass
class ProcessSampler:
    """Samples the process trees under `roots` (group -> root pid) every `interval_s`."""

    roots: dict[str, int]
    interval_s: float = 0.5
    gpu: GpuMemory | None = None
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paper-sampler", daemon=True)

    def start(self) -> ProcessSampler:
        self.sample()  # primes cpu_percent of every process seen so far
        self.samples.clear()
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(10)
        return self.samples

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())

    def _tree(self, pid: int) -> list[psutil.Process]:
        root = self._procs.get(pid)
        if root is None:
            try:
                root = self._procs[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return []
        try:
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        members = [root]
        for child in children:  # reuse the objects: cpu_percent measures since the object's last call
            members.append(self._procs.setdefault(child.pid, child))
        return members

    def sample(self) -> Sample:
        rss: dict[str, int] = {}
        cpu: dict[str, float] = {}
        pids: set[int] = set()
        for group, pid in self.roots.items():
            rss[group], cpu[group] = 0, 0.0
            for proc in self._tree(pid):
                try:
                    with proc.oneshot():
                        rss[group] += proc.memory_info().rss
                        cpu[group] += proc.cpu_percent(None)
                    pids.add(proc.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    self._procs.pop(proc.pid, None)
        gpu = self.gpu.used_by(pids) if self.gpu is not None else None
        machine = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)  # since the previous sample
        return Sample(time.time(), rss, cpu, gpu, machine)
