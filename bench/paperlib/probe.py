"""What is resident where, read from a running setup about once a second.

Baseline: each frontend's `/admin/cluster` (every expert is resident in its process). FaaSMoE
setups: the workers themselves, found through `/admin/cluster` and asked for their stats over the
wire protocol with the cluster token: the device-tier functions with their bytes and hit counts,
and the cumulative cold-start and eviction counters. A worker's hit count belongs to one
residency (a reload starts again at 0), so hits are accumulated across reloads here; hits made
after the last probe before an eviction are missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from bench.paperlib.setups import TOKEN, RunningSetup, admin_cluster
from runtime import protocol as p
from runtime.transport import RpcChannel, client_handshake, open_connection

log = logging.getLogger("bench.paper.probe")


@dataclass
class ResidencySample:
    """Resident expert bytes at one moment, in total and per tenant where attributable."""

    t: float
    resident_bytes: int
    per_tenant: dict[str, int] = field(default_factory=dict)


@dataclass
class FunctionUse:
    """One expert function over the run: probes that found it resident, and its hits."""

    layer: int = -1
    first: int = 0
    count: int = 0
    resident_samples: int = 0
    hits: int = 0
    _last_hits: int = 0

    def observe(self, hits: int) -> None:
        self.resident_samples += 1
        self.hits += hits - self._last_hits if hits >= self._last_hits else hits  # reloaded: counting anew
        self._last_hits = hits

    def gone(self) -> None:
        self._last_hits = 0


@dataclass
class ClusterProbe:
    """Polls a running setup; `samples`, `functions` and `counters()` hold what it saw."""

    setup: RunningSetup
    interval_s: float = 1.0
    samples: list[ResidencySample] = field(default_factory=list)
    functions: dict[str, FunctionUse] = field(default_factory=dict)
    probes: int = 0

    def __post_init__(self) -> None:
        self._channels: dict[str, RpcChannel] = {}
        self._last_counters: dict[str, dict[str, float]] = {}
        self._task: asyncio.Task | None = None
        self._addresses: dict[str, str] = {}

    # -- worker stats --------------------------------------------------------------------------

    async def _worker_addresses(self) -> dict[str, str]:
        if not self._addresses:  # asked again only after a worker stopped answering
            url = next(iter(self.setup.frontends.values()))
            cluster = await asyncio.to_thread(admin_cluster, url)
            self._addresses = {w["id"]: w["address"] for w in cluster["workers"]}
        return self._addresses

    async def _channel(self, wid: str, address: str) -> RpcChannel:
        channel = self._channels.get(wid)
        if channel is None or channel.closed.is_set():
            conn = await open_connection(address)
            await client_handshake(conn, TOKEN, "admin", "bench-paper-probe")
            channel = self._channels[wid] = RpcChannel(conn).start()
        return channel

    async def worker_stats(self) -> list[p.Stats]:
        stats = []
        for wid, address in (await self._worker_addresses()).items():
            try:
                reply = await (await self._channel(wid, address)).request(p.GetStats(0), timeout=10)
            except (OSError, ConnectionError, TimeoutError, p.ProtocolError) as exc:
                log.info("no stats from %s: %s", wid, exc)
                self._channels.pop(wid, None)
                self._addresses = {}
                continue
            if isinstance(reply, p.Stats):
                stats.append(reply)
                self._last_counters[wid] = dict(reply.counters)
        return stats

    def counters(self) -> dict[str, float]:
        """Cold starts and evictions, summed over the workers, as of the last probe."""
        total: dict[str, float] = {}
        for counters in self._last_counters.values():
            for name, value in counters.items():
                if name.startswith(("cold_starts_", "evictions_", "load_seconds_")):
                    total[name] = total.get(name, 0.0) + value
        return total

    # -- one probe -------------------------------------------------------------------------------

    async def probe(self) -> ResidencySample:
        now = time.time()
        if not self.setup.remote:
            per_tenant = {}
            for group, url in self.setup.frontends.items():
                cluster = await asyncio.to_thread(admin_cluster, url)
                per_tenant[group] = sum(m["resident_bytes"] for m in cluster["models"].values())
            sample = ResidencySample(now, sum(per_tenant.values()), per_tenant)
        else:
            stats = await self.worker_stats()
            seen: set[str] = set()
            total, per_tenant = 0, {}
            for s in stats:
                for r in s.resident:
                    if r.tier != "device":
                        continue
                    fid = r.function.function_id
                    total += r.nbytes
                    owner = r.function.owner  # a block only one tenant's private models use
                    if owner:
                        per_tenant[owner] = per_tenant.get(owner, 0) + r.nbytes
                    fn = r.function
                    self.functions.setdefault(fid, FunctionUse(fn.layer, fn.first, fn.count)).observe(r.hits)
                    seen.add(fid)
            for fid, use in self.functions.items():
                if fid not in seen:
                    use.gone()
            sample = ResidencySample(now, total, per_tenant)
        self.samples.append(sample)
        self.probes += 1
        return sample

    # -- background loop ----------------------------------------------------------------------------

    def start(self) -> ClusterProbe:
        self._task = asyncio.create_task(self._loop())
        return self

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe()
            except Exception as exc:  # a probe must never end the run; the next one tries again
                log.warning("probe of %s failed: %s", self.setup.name, exc)
            await asyncio.sleep(max(0.05, self.interval_s - (time.monotonic() - started)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def trunk_bytes(self) -> dict[str, int]:
        """Trunk bytes each frontend holds now (read once, after the warm-up loaded them)."""
        return {group: sum(m["trunk_bytes"] for m in admin_cluster(url)["models"].values())
                for group, url in self.setup.frontends.items()}
