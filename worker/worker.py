"""The worker process: owns one device and a memory budget, serves load / evict / invoke / stats.

Frontends and the scheduler connect to the worker's address (Unix socket in the local pool,
TCP for joined nodes) and authenticate with the cluster token. The worker also dials the
scheduler, registers what it holds (soft state: a restarted scheduler learns it again), sends
heartbeats and pushes every residency change. Compute runs in one thread per worker, off the
event loop, so heartbeats and stats keep flowing during long calls. A frontend on this host may
offer a connection shared memory (`runtime.shm`): its activations are then read, and the outputs
written, in place there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from faasmoe.model.content import ContentMismatch
from faasmoe.model.experts import ExpertBlock, run_blocks
from runtime import protocol as p
from runtime import ring
from runtime.compute import ComputeThread
from runtime.metrics import Registry
from runtime.periodic import every
from runtime.policies import make_eviction, make_keep_alive
from runtime.shm import SharedRegion, ShmRefused
from runtime.transport import Connection, RpcChannel, dial, server_handshake, start_server, stay_connected
from worker.memory import ExpertStore, Forbidden, HostCache, LoadFailed, NoMemory, Resident

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
EXPIRE_CHECK_S = 0.25
HOT_QUEUED_CALLS = 2  # calls of one function waiting behind others: worth a replica
# The hops to the compute thread and back cost 0.2-0.3 ms a call here (caches as cold as an expert call
# leaves them); calls predicted to take less than this run on the loop itself (heartbeats wait at most
# this long), longer ones on the compute thread. 6 ms takes in a batch-1 layer (4 experts, ~3-4.5 ms on the
# 2-core VM: 0.2 ms less per hop, measured with timestamps across both processes), not a batch of 4's.
INLINE_COMPUTE_S = 0.006


@dataclass
class WorkerConfig:
    worker_id: str
    listen: str  # "unix:/path" or "host:port" (port 0 = any)
    device: str
    budget_bytes: int
    host_budget_bytes: int
    token: str
    scheduler: str | None = None
    eviction: str = "lru"
    keep_alive_policy: str = "fixed"
    host_ttl_s: float = 600.0
    node: str = ""
    max_parallel_loads: int = 4  # disk reads at once: on the dev VM 2-4 reach its bandwidth
    parent_pid: int | None = None  # local pool: die with the scheduler instead of lingering
    join_timeout_s: float = 60.0  # never registered by then: exit 2 (later losses are retried forever)
    model_roots: tuple[str, ...] = ()  # checkpoints may be loaded only from under these; () = anywhere


class Worker:
    """One worker process's state and message handlers."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.metrics = Registry("worker", config.worker_id)
        self._define_metrics()
        self._keep_alive: dict[float, object] = {}
        self.store = ExpertStore(
            self.device, config.budget_bytes, HostCache(config.host_budget_bytes, pin=self.device.type == "cuda"),
            make_eviction(config.eviction), self._keep_alive_for, config.max_parallel_loads, self._on_residency,
            config.model_roots,
        )
        # One compute thread: a device runs one call at a time; the loop stays free for I/O.
        self._compute = ComputeThread(f"{config.worker_id}-compute")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Calls through a ring (runtime.ring) run on their connection's thread: one call on the device at a time.
        self._device_lock = threading.Lock()
        self._scheduler: RpcChannel | None = None
        self._queue_depth = 0
        self._queued: dict[str, int] = {}  # function -> calls waiting for the compute thread
        self._specs: dict[str, p.FunctionSpec] = {}  # every function a frontend has described to us
        self._row_cost: dict[str, float] = {}  # measured compute seconds per row, per function (EWMA)
        self.info: p.WorkerInfo | None = None
        self._stopping = asyncio.Event()
        self.listening = asyncio.Event()  # set once `info` holds the address
        self._joined = asyncio.Event()  # registered with the scheduler at least once
        self.exit_code = 0

    def _keep_alive_for(self, spec: p.FunctionSpec):
        ttl = spec.keep_alive_s
        if ttl not in self._keep_alive:
            self._keep_alive[ttl] = make_keep_alive(self.config.keep_alive_policy, ttl_s=ttl)
        return self._keep_alive[ttl]

    def _define_metrics(self) -> None:
        m = self.metrics
        labels = ("worker",)
        self.m_invocations = m.counter("faasmoe_expert_invocations_total", "Expert function calls served", labels)
        self.m_cold = m.counter("faasmoe_expert_cold_starts_total", "Calls that loaded their function first",
                                labels + ("source",))
        self.m_evictions = m.counter("faasmoe_expert_evictions_total", "Functions dropped from the device",
                                     labels + ("reason",))
        self.m_resident = m.gauge("faasmoe_resident_expert_bytes", "Expert bytes held, per memory tier",
                                  labels + ("tier",))
        self.m_invoke_s = m.histogram("faasmoe_worker_invoke_seconds", "Worker time per invoke message", labels)
        self.m_load_s = m.histogram("faasmoe_expert_load_seconds", "Time to make a function resident",
                                    labels + ("source",))
        self.m_queue = m.gauge("faasmoe_worker_queue_depth", "Invoke messages waiting or running", labels)
        # The series every invoke touches, looked up once: each labels() costs ~15 us on the hop, caches cold.
        wid = self.config.worker_id
        self._invoked, self._invoke_time = self.m_invocations.labels(worker=wid), self.m_invoke_s.labels(worker=wid)
        self._queued_gauge = self.m_queue.labels(worker=wid)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        server, address = await start_server(self.config.listen, self._serve_connection)
        self.info = p.WorkerInfo(
            worker_id=self.config.worker_id, address=str(address), device=str(self.device), pid=os.getpid(),
            budget_bytes=self.config.budget_bytes, host_budget_bytes=self.config.host_budget_bytes,
            node=self.config.node,
        )
        log.info("worker %s on %s listening at %s (budget %d bytes)", self.config.worker_id, self.device,
                 address, self.config.budget_bytes)
        self.listening.set()
        tasks = [every(EXPIRE_CHECK_S, self._expire_round, f"{self.config.worker_id} expiry")]
        if self.config.scheduler:
            tasks.append(asyncio.create_task(self._scheduler_loop()))
        try:
            await self._stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            server.close()
            self._compute.shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def _prewarm(self, spec: p.FunctionSpec, last_call: float) -> None:
        try:
            await self.store.prewarm(spec, last_call)
            log.info("pre-warmed %s ahead of its predicted next call", spec.function_id)
        except Exception as exc:  # a failed guess costs nothing but the log line
            log.warning("pre-warming %s failed: %s", spec.function_id, exc)

    def _expire_round(self) -> None:
        if self.config.parent_pid is not None and os.getppid() != self.config.parent_pid:
            log.warning("parent %d is gone; worker %s exits", self.config.parent_pid, self.config.worker_id)
            self.stop()
        now = time.monotonic()
        self.store.expire(now, self.config.host_ttl_s)
        for spec, last_call in self.store.due_prewarms(now):
            asyncio.create_task(self._prewarm(spec, last_call))
        self._update_gauges()

    # -- the scheduler link -------------------------------------------------------------------

    async def _scheduler_loop(self) -> None:
        """Stay registered: reconnect with backoff whenever the scheduler goes away."""
        address = self.config.scheduler
        connect = lambda: dial(address, self.config.token, "worker", self.config.worker_id,
                               self._handle_scheduler_message)
        link = asyncio.create_task(stay_connected(connect, self._registered, f"scheduler {address}", first_delay_s=0.2))
        joined = asyncio.create_task(self._joined.wait())
        await asyncio.wait([link, joined], timeout=self.config.join_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        joined.cancel()
        if not link.done() and not self._joined.is_set():
            link.cancel()
            log.error("cannot reach the scheduler at %s: not registered within %.0fs; is it running, and is "
                      "this its address?", address, self.config.join_timeout_s)
            self.exit_code = 2
            self.stop()
            return
        try:
            await link
        except p.ProtocolError as exc:
            # A wrong token or version will not fix itself: stop instead of knocking forever.
            log.error("scheduler %s refused this worker (%s): %s", address, self.config.worker_id, exc)
            self.exit_code = 2
            self.stop()

    async def _registered(self, channel: RpcChannel) -> None:
        """Register what this worker holds, then heartbeat until the connection drops."""
        reply = await channel.request(p.Register(0, self.info, self._resident_list()), timeout=10)
        if isinstance(reply, p.Error) and reply.code == "retry_later":
            raise ConnectionError(f"scheduler asks to retry later: {reply.message}")
        if isinstance(reply, p.Error):
            raise p.ProtocolError(reply.message)
        self._scheduler = channel
        self._joined.set()
        log.info("registered with scheduler %s", self.config.scheduler)
        try:
            seq = 0
            while not channel.closed.is_set():
                seq += 1
                await channel.conn.send_drain(p.Heartbeat(seq, time.time(), self._queue_depth, self._hot()))
                try:
                    await asyncio.wait_for(channel.closed.wait(), HEARTBEAT_S)
                except TimeoutError:
                    pass
        finally:
            self._scheduler = None

    async def _handle_scheduler_message(self, channel: RpcChannel, message: p.Message) -> None:
        if isinstance(message, p.Heartbeat):
            return
        asyncio.create_task(self._reply(channel.conn, message))

    def _on_residency(self, loaded: list[Resident], evicted: list[str], reason: str) -> None:
        self._update_gauges()
        for resident in loaded:  # one load = one cold start, however many calls waited for it
            self.m_cold.labels(worker=self.config.worker_id, source=resident.source).inc()
            self.m_load_s.labels(worker=self.config.worker_id, source=resident.source).observe(resident.load_s)
        for _ in evicted:
            self.m_evictions.labels(worker=self.config.worker_id, reason=reason).inc()
        channel = self._scheduler
        if channel is not None and not channel.closed.is_set():
            channel.conn.send(p.Residency(self.config.worker_id, [self._describe(r) for r in loaded], evicted, reason))

    def _hot(self) -> list[str]:
        return [fid for fid, n in self._queued.items() if n >= HOT_QUEUED_CALLS]

    def _describe(self, r: Resident) -> p.ResidentFunction:
        return p.ResidentFunction(r.spec, "device", r.nbytes, time.monotonic() - r.last_used, r.hits)

    def _resident_list(self) -> list[p.ResidentFunction]:
        return [self._describe(r) for r in self.store.resident.values()]

    def _update_gauges(self) -> None:
        wid = self.config.worker_id
        self.m_resident.labels(worker=wid, tier="device").set(self.store.used_bytes)
        self.m_resident.labels(worker=wid, tier="host").set(self.store.host.nbytes)

    # -- serving ---------------------------------------------------------------------------------

    async def _serve_connection(self, conn: Connection) -> None:
        await server_handshake(conn, self.config.token, self.config.worker_id)
        while True:
            message = await conn.recv()
            if isinstance(message, p.Heartbeat):
                conn.send(message)
                continue
            if isinstance(message, p.ShmOffer):  # here, not in a task: what follows may point into it
                conn.send(self._share_memory(conn, message))
                continue
            asyncio.create_task(self._reply(conn, message))

    def _share_memory(self, conn: Connection, offer: p.ShmOffer) -> p.Ok | p.Error:
        """Map a frontend's shared-memory region for this connection, or say why not."""
        try:
            if conn.region is not None:
                raise ShmRefused("this connection already shares memory")
            conn.region = SharedRegion.accept(offer)
        except (ShmRefused, OSError) as exc:
            log.info("connection from %s: invokes over the socket (%s)", conn.peer_id, exc)
            return p.Error(offer.req_id, "shm_unavailable", str(exc))
        how = "the socket as doorbell"
        if conn.region.slots and ring.enabled():
            try:
                conn.ring = ring.RingServer(conn.region, self._ring_invoke, f"{self.config.worker_id}-ring")
                how = "a call ring"
            except (OSError, ValueError) as exc:
                how = f"the socket as doorbell (no call ring: {exc})"
        log.info("connection from %s: invokes through shared memory (%d KiB), %s", conn.peer_id,
                 conn.region.nbytes >> 10, how)
        return p.Ok(offer.req_id)

    def _ring_invoke(self, call: ring.RingCall) -> tuple[torch.Tensor, float] | None:
        """Runs on a connection's ring thread: a call whose blocks are all resident, computed in place; None
        when one needs a load or its spec (the frontend then sends it through the socket, which loads)."""
        start = time.perf_counter()
        acquired: list[Resident] = []
        try:
            for fid in dict.fromkeys(call.function_ids):
                resident = self.store.try_acquire(fid) if fid in self._specs else None
                if resident is None:
                    return None
                acquired.append(resident)
            message = p.Invoke(0, call.function_ids, call.rows, call.x, call.experts)
            output, compute_s = self._run_calls(message, {r.spec.function_id: r for r in acquired}, call.dest)
            self._learn_cost(message, compute_s)
        finally:
            for resident in acquired:
                self.store.release(resident)
        self._invoked.inc(len(call.function_ids))
        self._invoke_time.observe(time.perf_counter() - start)
        return output, compute_s

    async def _reply(self, conn: Connection, message: p.Message) -> None:
        req_id = getattr(message, "req_id", 0)
        try:
            reply = await self.handle(message, conn.region)
        except NoMemory as exc:
            reply = p.Error(req_id, "no_memory", str(exc))
        except LoadFailed as exc:
            reply = p.Error(req_id, "load_failed", str(exc))
        except ContentMismatch as exc:  # the checkpoint no longer holds what the id names (memory.py logged it)
            reply = p.Error(req_id, "content_mismatch", str(exc))
        except Forbidden as exc:  # a checkpoint outside --model-root (memory.py logged it)
            reply = p.Error(req_id, "forbidden", str(exc))
        except Exception as exc:  # whatever went wrong, the caller gets an answer, never silence
            log.warning("request %s from %s failed: %r", type(message).__name__, conn.peer_id, exc)
            reply = p.Error(req_id, "bad_request", f"{type(exc).__name__}: {exc}")
        if not conn.closed:
            conn.send(reply)

    async def handle(self, message: p.Message, region: SharedRegion | None = None) -> p.Message:
        """The reply to a request; `region`: the connection's shared memory, where an invoke may want its output."""
        if isinstance(message, p.Invoke):
            return await self._invoke(message, region)
        if isinstance(message, p.Load):
            self._specs[message.function.function_id] = message.function
            resident, _ = await self.store.acquire(message.function, ahead=True)  # a prefetch or a replica
            self.store.release(resident)
            return p.Ok(message.req_id)
        if isinstance(message, p.Evict):
            self.store.evict(message.function_id, message.reason)
            return p.Ok(message.req_id)
        if isinstance(message, p.GetStats):
            return self.stats(message.req_id)
        raise ValueError(f"a worker does not handle {type(message).__name__}")

    def stats(self, req_id: int = 0) -> p.Stats:
        s = self.store.stats
        counters: dict[str, float] = {f"cold_starts_{k}": v for k, v in s.cold_starts.items()}
        counters.update({f"load_seconds_{k}": v for k, v in s.load_seconds.items()})
        counters.update({f"evictions_{k}": v for k, v in s.evictions.items()})
        counters.update(device_bytes=self.store.used_bytes, host_bytes=self.store.host.nbytes,
                        queue_depth=self._queue_depth, blocks_unpacked=self.store.unpacked)
        host = [p.ResidentFunction(spec or p.FunctionSpec(fid, "", -1, 0, 0), "host", nbytes)
                for fid, spec, nbytes in self.store.host.held()]
        return p.Stats(req_id, self.info, self._resident_list() + host, counters, self.metrics.render())

    async def _invoke(self, message: p.Invoke, region: SharedRegion | None = None) -> p.Result | p.Error:
        start = time.perf_counter()
        for spec in message.specs:
            self._specs[spec.function_id] = spec
        if len(message.function_ids) != len(message.rows) or sum(message.rows) != message.x.shape[0] or \
                message.experts.shape != message.x.shape[:1]:
            raise ValueError("invoke: function_ids, rows, x and experts do not line up")
        ids = set(message.function_ids)
        unknown = sorted(fid for fid in ids if fid not in self._specs)
        if unknown:
            return p.Error(message.req_id, "unknown_function", f"no spec for {', '.join(unknown)}")
        self._queue_depth += 1
        self._queued_gauge.set(self._queue_depth)
        acquired: list[Resident] = []
        cold = 0
        try:
            for fid in ids:  # warm blocks are taken synchronously; only cold ones wait for a load
                resident = self.store.try_acquire(fid)
                if resident is not None:
                    acquired.append(resident)
            missing = [self._specs[fid] for fid in ids if fid not in {r.spec.function_id for r in acquired}]
            if missing:
                results = await asyncio.gather(*(self.store.acquire(spec) for spec in missing),
                                               return_exceptions=True)
                for result in results:
                    if not isinstance(result, BaseException):
                        acquired.append(result[0])
                        cold += result[1]
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
            by_id = {r.spec.function_id: r for r in acquired}
            load_s = time.perf_counter() - start if missing else 0.0  # what the call waited for loads
            # The decoder checked the span; the frontend lends it to this invoke until our reply.
            dest = region.view(message.out_offset, message.out_nbytes) if message.out_offset >= 0 else None
            if self._predicted_s(message) < INLINE_COMPUTE_S and not self._queued:
                output, compute_s = self._run_calls(message, by_id, dest)
            else:
                for fid in by_id:
                    self._queued[fid] = self._queued.get(fid, 0) + 1
                try:
                    output, compute_s = await self._compute.run(self._run_calls, message, by_id, dest)
                finally:
                    for fid in by_id:
                        self._queued[fid] -= 1
                        if not self._queued[fid]:
                            del self._queued[fid]
            self._learn_cost(message, compute_s)
        finally:
            for resident in acquired:
                self.store.release(resident)
            self._queue_depth -= 1
            self._queued_gauge.set(self._queue_depth)
        self._invoked.inc(len(message.function_ids))
        self._invoke_time.observe(time.perf_counter() - start)
        return p.Result(message.req_id, output, cold, load_s, compute_s)

    def _predicted_s(self, message: p.Invoke) -> float:
        return sum(self._row_cost.get(fid, float("inf")) * max(n, 1) for fid, n in zip(message.function_ids, message.rows))

    def _learn_cost(self, message: p.Invoke, seconds: float) -> None:
        per_row = seconds / max(1, sum(message.rows))
        for fid in message.function_ids:
            old = self._row_cost.get(fid)
            self._row_cost[fid] = per_row if old is None else 0.8 * old + 0.2 * per_row

    def _run_calls(self, message: p.Invoke, by_id: dict[str, Resident],
                   dest: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Runs in the compute thread (or a ring's): every call of the message together (their experts share the
        cores); and the seconds it took. The output lands in `dest` (shared memory, bytes) when it fits."""
        xs, experts = message.x.split(message.rows), message.experts.split(message.rows)
        with self._device_lock, torch.inference_mode():  # a ring's thread and the compute thread: one at a time
            start = time.perf_counter()
            if self._stream is None:
                output = self._run_blocks(message.function_ids, xs, experts, by_id, dest)
            else:
                with torch.cuda.stream(self._stream):
                    output = self._run_blocks(message.function_ids, xs, experts, by_id, None)
                    out = _output_area(dest, output.shape, output.dtype)
                    output = out.copy_(output) if out is not None else output.to("cpu", non_blocking=True)
                self._stream.synchronize()
            return output, time.perf_counter() - start

    def _run_blocks(self, fids: list[str], xs: tuple[torch.Tensor, ...], experts: tuple[torch.Tensor, ...],
                    by_id: dict[str, Resident], dest: torch.Tensor | None) -> torch.Tensor:
        calls = [self._checked_call(fid, x, e, by_id[fid].block) for fid, x, e in zip(fids, xs, experts)]
        outputs = run_blocks(calls)
        if dest is not None and outputs[0].device.type == "cpu" and all(o.dtype == outputs[0].dtype for o in outputs):
            out = _output_area(dest, (sum(o.shape[0] for o in outputs), *outputs[0].shape[1:]), outputs[0].dtype)
            if out is not None:
                return torch.cat(outputs, out=out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _checked_call(self, fid: str, x: torch.Tensor, experts: torch.Tensor,
                      block: ExpertBlock) -> tuple[ExpertBlock, torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != block.hidden_size:
            raise ValueError(f"call to {fid}: x has shape {list(x.shape)}, expected [n, {block.hidden_size}]")
        # The expert indices are checked by the block itself (ExpertBlock._start), before any work starts.
        x = x.to(self.device, block.dtype, non_blocking=True)
        return block, x, experts.to(self.device, torch.long, non_blocking=True)


def _output_area(dest: torch.Tensor | None, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """The first bytes of `dest` (uint8, shared memory) as an output of this shape, if it fits there."""
    nbytes = dtype.itemsize
    for dim in shape:
        nbytes *= dim
    if dest is None or not nbytes or nbytes > dest.numel():
        return None
    return dest[:nbytes].view(dtype).view(shape)
