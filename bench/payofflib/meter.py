"""Weight bytes held, sampled about once a second from the servers' own accounting.

Every setup reports what it holds through `/admin/cluster`: in process, each model's resident expert bytes
and trunk bytes (each process its own copy); with remote experts, the workers' device-tier and host-cache
bytes (a function held once however many models use it) and the frontend's distinct trunk bytes (a tensor
several models share counted once). Beside them, the page cache that holds the checkpoints' files: the host
memory that makes a reload fast, reclaimable but not free. KV caches and process overhead are not weights:
they are in the process RSS, reported apart (bench/paperlib/sampler.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.paperlib.setups import RunningSetup, admin_cluster
from runtime.periodic import every
from tests.pagecache import page_cache_bytes

log = logging.getLogger("bench.payoff.meter")


@dataclass(frozen=True)
class WeightSample:
    t: float  # wall time
    expert_device: int  # expert bytes in the memory experts compute from (the device tier)
    expert_host: int  # expert bytes in workers' host caches
    trunk: int  # trunk bytes (embeddings, attention, norms, shared experts, lm_head)
    page_cache: int  # bytes of the checkpoint files in the page cache

    @property
    def weights_device(self) -> int:
        return self.expert_device + self.trunk


def read_weights(setup: RunningSetup, files: list[Path]) -> WeightSample:
    device = host = trunk = 0
    for url in setup.frontends.values():
        cluster = admin_cluster(url)
        if setup.remote:
            device += sum(w["device_bytes"] for w in cluster["workers"])
            host += sum(w["host_cache_bytes"] for w in cluster["workers"])
            trunk += cluster["distinct_trunk_bytes"]
        else:
            device += sum(m["resident_bytes"] for m in cluster["models"].values())
            trunk += sum(m["trunk_bytes"] for m in cluster["models"].values())
    cached = sum(page_cache_bytes(f) for f in files)
    return WeightSample(time.time(), device, host, trunk, cached)


@dataclass
class WeightMeter:
    """Samples `read_weights` every `interval_s` in the background while a trace replays."""

    setup: RunningSetup
    files: list[Path]
    interval_s: float = 1.0
    samples: list[WeightSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._task: asyncio.Task | None = None

    def start(self) -> WeightMeter:
        # A missed sample must not end the run (every() logs it and goes on); the integral spans the gap.
        self._task = every(self.interval_s, self._sample, f"weights of {self.setup.name}")
        return self

    async def _sample(self) -> None:
        self.samples.append(await asyncio.to_thread(read_weights, self.setup, self.files))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def gib_seconds(samples: list[WeightSample], start: float, end: float, value) -> float | None:
    """The integral of value(sample) over [start, end] (trapezoids between samples), in GiB x seconds."""
    inside = [s for s in samples if start <= s.t <= end]
    if len(inside) < 2:
        return None
    area = sum((b.t - a.t) * (value(a) + value(b)) / 2 for a, b in zip(inside, inside[1:]))
    return area / 2**30
