"""The scheduler daemon: knows every worker and function, places functions, pushes routing.

It is never on the per-token path. Workers register (re-declaring what they hold: soft state),
send heartbeats and residency changes; frontends subscribe to a versioned routing table and
ask for a placement only when a function has none. A worker whose heartbeats stop is declared
dead and dropped from the table; the local pool restarts its own crashed workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from runtime import protocol as p
from runtime.metrics import Registry
from runtime.periodic import every
from runtime.placement import CacheAwarePlacement, WorkerView
from runtime.pool import LocalPool
from runtime.transport import Address, Connection, RpcChannel, server_handshake, start_server

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    listen: str = "127.0.0.1:7070"
    token: str = ""
    workers: int = 0  # local pool size
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    worker_memory_bytes: int | None = None
    host_cache_bytes: int | None = None
    worker_args: list[str] = field(default_factory=list)  # extra flags for local workers
    heartbeat_timeout_s: float = 3.0
    socket_dir: Path | None = None
    max_replicas: int = 4  # of one hot function
    quarantine_s: float = 30.0  # an unhealthy joined worker is kept out of placement this long


# A worker is unhealthy when more than UNHEALTHY_FAILURES of its last OUTCOME_WINDOW invokes,
# as frontends report them, failed or timed out (OpenWhisk's rule).
OUTCOME_WINDOW = 10
UNHEALTHY_FAILURES = 3


@dataclass
class WorkerRecord:
    info: p.WorkerInfo
    channel: RpcChannel
    view: WorkerView
    last_seen: float
    specs: dict[str, p.FunctionSpec] = field(default_factory=dict)
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=OUTCOME_WINDOW))  # frontends' reports

    def live(self, now: float, timeout_s: float) -> bool:
        return not self.channel.closed.is_set() and now - self.last_seen <= timeout_s


class Scheduler:
    """Registry, placement and routing for one cluster."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.server_id = f"scheduler-{uuid.uuid4().hex[:8]}"
        self.workers: dict[str, WorkerRecord] = {}
        self.placement = CacheAwarePlacement()
        self.pending: dict[str, dict[str, float]] = {}  # function -> worker -> placed at (not yet loaded)
        self.subscribers: set[Connection] = set()
        self.version = 0
        self.address: Address | None = None
        self.pool: LocalPool | None = None
        self.metrics = Registry()
        self.m_workers = self.metrics.gauge("faasmoe_scheduler_workers", "Live registered workers")
        self.m_dead = self.metrics.counter("faasmoe_scheduler_worker_deaths_total", "Workers declared dead")
        self.m_placements = self.metrics.counter("faasmoe_scheduler_placements_total", "Placement decisions")
        self.m_unhealthy = self.metrics.counter("faasmoe_scheduler_unhealthy_workers_total",
                                                "Workers taken out for failing or timing out invokes")
        self.quarantined: dict[str, float] = {}  # worker id -> until (monotonic)
        self.m_routing = self.metrics.gauge("faasmoe_scheduler_routing_version", "Routing table version")
        self._stopping = asyncio.Event()
        self._tmp: tempfile.TemporaryDirectory | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Address:
        self._server, self.address = await start_server(self.config.listen, self._serve_connection)
        self._monitor = every(self.config.heartbeat_timeout_s / 4, self._monitor_round, "scheduler monitor")
        if self.config.workers:
            socket_dir = self.config.socket_dir
            if socket_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="faasmoe-")
                socket_dir = Path(self._tmp.name)
            self.pool = LocalPool(self.config.workers, self.config.devices, str(self.address), self.config.token,
                                  socket_dir, self.config.worker_memory_bytes, self.config.host_cache_bytes,
                                  self.config.worker_args)
            self.pool.start()
        log.info("scheduler %s listening at %s", self.server_id, self.address)
        return self.address

    async def wait_for_workers(self, count: int, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.workers) < count:
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stopping.set()
        self._monitor.cancel()
        self._server.close()
        if self.pool is not None:
            await self.pool.stop()  # workers first, so none of them sees its scheduler vanish
        for record in list(self.workers.values()):
            await record.channel.close()
        for conn in list(self.subscribers):
            await conn.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- connections ---------------------------------------------------------------------------

    async def _serve_connection(self, conn: Connection) -> None:
        auth = await server_handshake(conn, self.config.token, self.server_id)
        if auth.role == "worker":
            await self._serve_worker(conn)
        elif auth.role in ("frontend", "admin"):
            await self._serve_frontend(conn)
        else:
            raise p.ProtocolError(f"unknown role {auth.role!r}")

    async def _serve_worker(self, conn: Connection) -> None:
        register = await conn.recv()
        if not isinstance(register, p.Register):
            raise p.ProtocolError(f"a worker must register first, sent {type(register).__name__}")
        wid = register.worker.worker_id
        refusal = self._refusal(register)
        if refusal is not None:
            log.warning("refused worker %s from %s: %s", wid, register.worker.address, refusal.message)
            await conn.send_drain(refusal)
            return
        old = self.workers.get(wid)
        if old is not None:
            await old.channel.close()  # a reconnect of the same worker replaces the old link
        channel = RpcChannel(conn, lambda m: self._on_worker_message(wid, m))
        view = WorkerView(wid, register.worker.budget_bytes)
        record = WorkerRecord(register.worker, channel, view, time.monotonic())
        self.workers[wid] = record
        for resident in register.resident:
            self._hold(record, resident)
        conn.send(p.Ok(register.req_id))
        log.info("worker %s registered from %s (%s, %d functions resident)", wid, register.worker.address,
                 register.worker.device, len(register.resident))
        self._publish()
        channel.start()
        await channel.closed.wait()
        if self.workers.get(wid) is record:
            self._drop(wid, "connection closed")

    def _refusal(self, register: p.Register) -> p.Error | None:
        """Why this registration is refused, if it is: the id belongs to another live worker, or the
        worker is in quarantine for failing invokes (it may knock again later)."""
        wid, info = register.worker.worker_id, register.worker
        old = self.workers.get(wid)
        same = old is not None and (old.info.pid, old.info.address, old.info.node) == (info.pid, info.address, info.node)
        if old is not None and not same and old.live(time.monotonic(), self.config.heartbeat_timeout_s):
            return p.Error(register.req_id, "duplicate_worker_id",
                           f"worker id {wid!r} is taken by the live worker at {old.info.address} (pid {old.info.pid});"
                           " give this one another --id")
        until = self.quarantined.get(wid, 0.0)
        if time.monotonic() < until:
            return p.Error(register.req_id, "retry_later",
                           f"worker {wid} failed too many invokes; quarantined for {until - time.monotonic():.0f}s more")
        return None

    def _on_report(self, report: p.WorkerReport) -> None:
        record = self.workers.get(report.worker_id)
        if record is None:
            return
        record.outcomes.extend([True] * min(report.ok, OUTCOME_WINDOW) + [False] * min(report.failed, OUTCOME_WINDOW))
        failures = record.outcomes.count(False)
        if failures > UNHEALTHY_FAILURES:
            self._take_out(report.worker_id, f"{failures} of its last {len(record.outcomes)} invokes failed "
                                             f"({report.reason or 'error'})")

    def _take_out(self, wid: str, why: str) -> None:
        """An unhealthy worker leaves the routing table: a local one is restarted, a joined one waits
        out a quarantine before it may register again."""
        self.m_unhealthy.inc()
        pid = self.pool.pids().get(wid) if self.pool is not None else None
        if pid is not None:
            log.warning("worker %s is unhealthy (%s): restarting it", wid, why)
            try:
                os.kill(pid, signal.SIGKILL)  # a stuck kernel does not answer SIGTERM; the pool restarts it
            except ProcessLookupError:
                pass
        else:
            log.warning("worker %s is unhealthy (%s): quarantined for %.0fs", wid, why, self.config.quarantine_s)
            self.quarantined[wid] = time.monotonic() + self.config.quarantine_s
        self._drop(wid, f"unhealthy: {why}")

    def _on_worker_message(self, wid: str, message: p.Message) -> None:
        record = self.workers.get(wid)
        if record is None:
            return
        record.last_seen = time.monotonic()
        if isinstance(message, p.Heartbeat):
            record.view.queue_depth = message.queue_depth
            for fid in message.hot:
                self._replicate(fid)
        elif isinstance(message, p.Residency):
            for resident in message.loaded:
                self._hold(record, resident)
            for fid in message.evicted:
                record.view.device_ids.discard(fid)
                record.view.host_ids.add(fid)
                spec = record.specs.pop(fid, None)
                if spec is not None:
                    record.view.used_bytes -= spec.nbytes or 0
            self._publish()

    def _hold(self, record: WorkerRecord, resident: p.ResidentFunction) -> None:
        fid = resident.function.function_id
        if fid not in record.view.device_ids:
            record.view.used_bytes += resident.nbytes
        record.view.device_ids.add(fid)
        record.view.host_ids.discard(fid)
        record.specs[fid] = p.FunctionSpec(**{**vars(resident.function), "nbytes": resident.nbytes})
        self.pending.get(fid, {}).pop(record.info.worker_id, None)

    async def _serve_frontend(self, conn: Connection) -> None:
        self.subscribers.add(conn)
        try:
            while True:
                message = await conn.recv()
                if isinstance(message, p.Subscribe):
                    conn.send(p.Ok(message.req_id))
                    conn.send(self.routing_update())
                elif isinstance(message, p.Place):
                    conn.send(self.place(message))
                elif isinstance(message, p.GetStats):
                    asyncio.create_task(self._send_cluster_state(conn, message.req_id))
                elif isinstance(message, p.WorkerReport):
                    self._on_report(message)
                else:
                    raise p.ProtocolError(f"a frontend cannot send {type(message).__name__}")
        finally:
            self.subscribers.discard(conn)

    # -- placement and routing -------------------------------------------------------------------

    def place(self, request: p.Place) -> p.Message:
        fid = request.function.function_id
        live = [r.view for r in self.workers.values()]
        held = [wid for wid in self.routes().get(fid, []) if wid not in request.exclude]
        if held:
            return p.Placement(request.req_id, fid, held)
        nbytes = request.function.nbytes
        for record in self.workers.values():  # count placements in flight, or a burst lands on one worker
            wid = record.info.worker_id
            record.view.pending = sum(1 for placed in self.pending.values() if wid in placed)
        self._enforce_quota(request.function)
        chosen = self.placement.choose(fid, nbytes, live, set(request.exclude))
        if not chosen:
            return p.Error(request.req_id, "unavailable",
                           f"no live worker can hold {request.function.name or fid} ({nbytes} bytes); "
                           f"workers: {len(self.workers)}")
        for wid in chosen:
            self.pending.setdefault(fid, {})[wid] = time.monotonic()
        self.m_placements.inc()
        self._publish()
        return p.Placement(request.req_id, fid, chosen)

    def _enforce_quota(self, spec: p.FunctionSpec) -> None:
        """A private function's owner holds at most owner_quota_bytes: before another of its functions
        is placed, the owner's longest-resident functions are evicted until it fits (a worker keeps
        the ones in use, so a request's working set may pass the quota until its calls return)."""
        if not spec.owner or spec.owner_quota_bytes <= 0:
            return
        held = [(wid, fid, s.nbytes or 0) for wid, record in self.workers.items() for fid, s in record.specs.items()
                if s.owner == spec.owner and fid != spec.function_id]
        total = sum(n for _, _, n in held) + (spec.nbytes or 0)
        for wid, fid, nbytes in held:  # in load order: the oldest first
            if total <= spec.owner_quota_bytes:
                break
            log.info("evicting %s from %s: tenant %s is at its memory quota", fid, wid, spec.owner)
            asyncio.create_task(self._evict_quietly(wid, fid, "quota"))
            total -= nbytes

    async def _evict_quietly(self, wid: str, fid: str, reason: str) -> None:
        try:
            await self.evict(wid, fid, reason)
        except (ConnectionError, TimeoutError, KeyError) as exc:
            log.warning("evicting %s from %s failed: %r", fid, wid, exc)

    def _replicate(self, fid: str) -> None:
        """A function with calls queued up gets one more replica, where memory allows."""
        holders = set(self.routes().get(fid, []))
        spec = next((self.workers[w].specs[fid] for w in holders if fid in self.workers[w].specs), None)
        if spec is None or len(holders) >= self.config.max_replicas:
            return
        roomy = [r.view for r in self.workers.values() if r.view.free_bytes >= spec.nbytes]
        chosen = self.placement.choose(fid, spec.nbytes, roomy, holders)
        if not chosen:
            return
        wid = chosen[0]
        self.pending.setdefault(fid, {})[wid] = time.monotonic()
        log.info("replicating hot function %s to %s (%d replicas)", fid, wid, len(holders) + 1)
        asyncio.create_task(self._preload(wid, spec))
        self._publish()

    async def _preload(self, wid: str, spec: p.FunctionSpec) -> None:
        record = self.workers.get(wid)
        if record is None:
            return
        try:
            await record.channel.request(p.Load(0, spec), timeout=120)
        except (ConnectionError, TimeoutError) as exc:
            log.warning("preloading %s on %s failed: %s", spec.function_id, wid, exc)

    def routes(self) -> dict[str, list[str]]:
        table: dict[str, list[str]] = {}
        for wid, record in self.workers.items():
            for fid in record.view.device_ids:
                table.setdefault(fid, []).append(wid)
        for fid, placed in self.pending.items():
            for wid in placed:
                if wid in self.workers and wid not in table.get(fid, []):
                    table.setdefault(fid, []).append(wid)
        return table

    def routing_update(self) -> p.RoutingUpdate:
        return p.RoutingUpdate(self.version, self.routes(), [r.info for r in self.workers.values()])

    def _publish(self) -> None:
        self.version += 1
        self.m_routing.set(self.version)
        self.m_workers.set(len(self.workers))
        update = self.routing_update()
        for conn in list(self.subscribers):
            if conn.closed:
                self.subscribers.discard(conn)
            else:
                conn.send(update)

    def _drop(self, wid: str, why: str) -> None:
        record = self.workers.pop(wid, None)
        if record is None:
            return
        for placed in self.pending.values():
            placed.pop(wid, None)
        if self._stopping.is_set():
            log.info("worker %s left: %s", wid, why)
        else:
            self.m_dead.inc()
            log.warning("worker %s dropped: %s (%d functions re-placed on demand)", wid, why,
                        len(record.view.device_ids))
        asyncio.create_task(record.channel.close())
        self._publish()

    def _monitor_round(self) -> None:
        now = time.monotonic()
        for wid, record in list(self.workers.items()):
            if now - record.last_seen > self.config.heartbeat_timeout_s:
                self._drop(wid, f"no heartbeat for {now - record.last_seen:.1f}s")
        for fid, placed in list(self.pending.items()):  # placements never loaded expire
            for wid, at in list(placed.items()):
                if now - at > 60.0:
                    del placed[wid]
            if not placed:
                del self.pending[fid]

    async def _send_cluster_state(self, conn: Connection, req_id: int) -> None:
        conn.send(p.ClusterState(req_id, await self.worker_stats()))

    async def worker_stats(self) -> list[p.Stats]:
        async def one(record: WorkerRecord) -> p.Stats | None:
            try:
                reply = await record.channel.request(p.GetStats(0), timeout=5)
            except (ConnectionError, TimeoutError):
                return None
            return reply if isinstance(reply, p.Stats) else None

        return [s for s in await asyncio.gather(*(one(r) for r in list(self.workers.values()))) if s]

    async def evict(self, wid: str, fid: str, reason: str = "scheduler") -> p.Message:
        return await self.workers[wid].channel.request(p.Evict(0, fid, reason), timeout=10)
