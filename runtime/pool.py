"""The scheduler's local worker pool: spawns one worker process per slot and restarts crashes."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.budgets import device_budget, host_cache_budget
from runtime.openmp import OMP_WAIT_POLICY

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class PoolSlot:
    index: int
    device: str
    socket: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0


class LocalPool:
    """Worker processes on this machine, on Unix sockets, kept alive until `stop`."""

    def __init__(
        self,
        size: int,
        devices: list[str],
        scheduler_address: str,
        token: str,
        socket_dir: Path,
        memory_bytes: int | None = None,
        host_cache_bytes: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.token = token
        self.memory_bytes = memory_bytes
        self.host_cache_bytes = host_cache_bytes
        self.extra_args = extra_args or []
        socket_dir.mkdir(parents=True, exist_ok=True)
        self.slots = [PoolSlot(i, devices[i % len(devices)], socket_dir / f"worker-{i}.sock") for i in range(size)]
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False

    @staticmethod
    def worker_id(index: int) -> str:
        return f"local-{index}"

    def start(self) -> None:
        self._supervisors = [asyncio.create_task(self._supervise(slot)) for slot in self.slots]

    def pids(self) -> dict[str, int]:
        return {self.worker_id(s.index): s.process.pid for s in self.slots if s.process and s.process.returncode is None}

    async def _spawn(self, slot: PoolSlot) -> asyncio.subprocess.Process:
        args = [sys.executable, "-m", "worker", "--id", self.worker_id(slot.index), "--device", slot.device,
                "--listen", f"unix:{slot.socket}", "--scheduler", self.scheduler_address,
                "--parent-pid", str(os.getpid()), *self.extra_args]
        memory = self.memory_bytes
        if memory is None and slot.device == "cpu":
            # CPU workers share one RAM: each gets its share, not 90% of all of it.
            memory = device_budget(torch.device("cpu"), sharers=sum(1 for s in self.slots if s.device == "cpu"))
        if memory:
            args += ["--memory", str(memory)]
        host_cache = self.host_cache_bytes
        if host_cache is None:  # none on CPU; GPU workers share the host's RAM for their pinned caches
            gpu_slots = sum(1 for s in self.slots if s.device != "cpu")
            host_cache = host_cache_budget(torch.device(slot.device), sharers=gpu_slots)
        args += ["--host-cache", str(host_cache)]
        # The token travels in the environment, not argv, so `ps` does not show it.
        env = {"OMP_WAIT_POLICY": OMP_WAIT_POLICY, **os.environ, "FAASMOE_TOKEN": self.token}
        return await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.DEVNULL)

    async def _supervise(self, slot: PoolSlot) -> None:
        while not self._stopping:
            slot.process = await self._spawn(slot)
            log.info("started worker %s (pid %d) on %s", self.worker_id(slot.index), slot.process.pid, slot.device)
            code = await slot.process.wait()
            if self._stopping:
                return
            delay = RESTART_BACKOFF_S[min(slot.restarts, len(RESTART_BACKOFF_S) - 1)]
            slot.restarts += 1
            log.warning("worker %s exited with %s; restarting in %.1fs", self.worker_id(slot.index), code, delay)
            await asyncio.sleep(delay)

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        running = [s.process for s in self.slots if s.process and s.process.returncode is None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                process.kill()
                await process.wait()
