"""The runtime's client API for frontends: resolve functions to workers and invoke them.

A `RuntimeClient` keeps the scheduler's pushed routing table and a connection per worker.
`invoke` takes one layer's calls, sends one message per worker, and returns the outputs in
call order. Invocations are idempotent, so when a worker dies mid-call (or cannot fit a
block) its calls are re-placed elsewhere and retried: the caller sees the right result, late.
A worker on this host gets each connection's activations and outputs through shared memory
(`runtime.shm`; the socket carries only the message) unless FAASMOE_SHM=0.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import uuid
from dataclasses import dataclass, field

import torch

from runtime import protocol as p
from runtime import ring, shm
from runtime.transport import RpcChannel, dial, stay_connected

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
RETRYABLE = ("no_memory", "load_failed", "unavailable")
# An invoke's deadline: max(DEADLINE_MIN_S, DEADLINE_FACTOR x the worker's measured compute for
# that many rows), plus time to load the blocks cold at a slow disk's pace.
DEADLINE_MIN_S = 2.0
DEADLINE_FACTOR = 20.0
LOAD_FLOOR_BYTES_S = 64 * 1024 * 1024


class InvokeError(RuntimeError):
    """Calls that failed on every worker tried."""


@dataclass
class ClientStats:
    invocations: int = 0  # function calls sent
    messages: int = 0  # invoke messages sent (one per worker per layer)
    shm_messages: int = 0  # of those, the ones whose tensors went through shared memory
    ring_messages: int = 0  # of those, the ones the worker served from the call ring (no socket message)
    sync_messages: int = 0  # of those, the ones called from a thread off the event loop (`invoke_warm`)
    cold_starts: int = 0
    retries: int = 0
    load_s: float = 0.0
    compute_s: float = 0.0
    prefetches: int = 0  # loads asked ahead of their calls that completed
    per_worker: dict[str, int] = field(default_factory=dict)


@dataclass
class FunctionCall:
    """One function's share of a layer, as the caller sees it: its spec, rows and experts."""

    function: p.FunctionSpec
    x: torch.Tensor
    experts: torch.Tensor


@dataclass
class InvokeMeter:
    """What one `invoke` cost, for the caller's own accounting (the client's stats are global)."""

    cold_starts: int = 0
    compute_s: float = 0.0
    messages: int = 0
    load_wait_s: float = 0.0  # how long the layer waited for loads: its messages run at once, so the longest wait


class RuntimeClient:
    """Connection to one cluster: the routing table plus a channel per worker."""

    def __init__(self, scheduler: str, token: str, client_id: str | None = None,
                 deadline_min_s: float = DEADLINE_MIN_S, deadline_factor: float = DEADLINE_FACTOR,
                 shm_slots: int | None = None, shm_slot_bytes: int = shm.DEFAULT_SLOT_BYTES,
                 call_ring: bool | None = None) -> None:
        """`shm_slots`: invokes in flight per worker connection through shared memory, each up to
        `shm_slot_bytes` of activations and of outputs (default: shm.DEFAULT_SLOTS, 0 when FAASMOE_SHM=0).
        `call_ring`: post warm invokes into those slots with a pipe as doorbell (`runtime.ring`) instead
        of a socket message (default: unless FAASMOE_RING=0)."""
        self.scheduler_address = scheduler
        self.call_ring = ring.enabled() if call_ring is None else call_ring
        self.shm_slots = (shm.DEFAULT_SLOTS if shm.enabled() else 0) if shm_slots is None else shm_slots
        self.shm_slot_bytes = shm_slot_bytes
        self.deadline_min_s = deadline_min_s
        self.deadline_factor = deadline_factor
        self.token = token
        self.client_id = client_id or f"frontend-{uuid.uuid4().hex[:8]}"
        self.routes: dict[str, list[str]] = {}
        self.workers: dict[str, p.WorkerInfo] = {}
        self.version = -1
        self.stats = ClientStats()
        self._scheduler: RpcChannel | None = None
        self._channels: dict[str, RpcChannel] = {}
        self._known: dict[str, set[str]] = {}  # worker -> function ids whose spec it has been sent
        self._row_cost: dict[str, float] = {}  # worker -> measured compute seconds per row (EWMA)
        self._outcomes: dict[str, list[int]] = {}  # worker -> [ok, failed] since the last report
        self._prefetching: dict[str, asyncio.Task[None]] = {}
        self._connecting: dict[str, asyncio.Task[RpcChannel]] = {}
        self._routing_ready = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    # -- scheduler link ----------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> RuntimeClient:
        self._keeper = asyncio.create_task(self._keep_subscribed())
        async with asyncio.timeout(timeout):
            await self._routing_ready.wait()
        return self

    async def _keep_subscribed(self) -> None:
        """Follow the routing table; on scheduler loss keep the last table and reconnect."""
        connect = lambda: dial(self.scheduler_address, self.token, "frontend", self.client_id,
                               lambda _, message: self._on_scheduler_message(message))
        while True:
            try:
                await stay_connected(connect, self._subscribed, f"scheduler {self.scheduler_address}")
            except p.ProtocolError as exc:  # a frontend keeps serving its last table; knock again later
                log.error("scheduler %s refused us: %s", self.scheduler_address, exc)
                await asyncio.sleep(2.0)

    async def _subscribed(self, channel: RpcChannel) -> None:
        await channel.request(p.Subscribe(0), timeout=10)
        self._scheduler = channel
        try:
            await channel.closed.wait()
        finally:
            self._scheduler = None
        log.warning("lost the scheduler; serving from routing table v%d while reconnecting", self.version)

    def _on_scheduler_message(self, message: p.Message) -> None:
        if isinstance(message, p.RoutingUpdate) and message.version != self.version:
            self.version = message.version
            self.routes = message.functions
            self.workers = {w.worker_id: w for w in message.workers}
            for wid in [w for w in self._channels if w not in self.workers]:
                asyncio.create_task(self._channels.pop(wid).close())
            for wid in [w for w in self._connecting if w not in self.workers]:  # a dial to a dropped worker
                self._connecting.pop(wid).cancel()
            self._routing_ready.set()

    async def _scheduler_request(self, message: p.Message, wait_s: float = 10.0) -> p.Message:
        """A request to the scheduler, waiting out a reconnect (it may be restarting)."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            channel = self._scheduler
            if channel is not None and not channel.closed.is_set():
                try:
                    return await channel.request(message, timeout=10)
                except ConnectionError:
                    pass
            if asyncio.get_running_loop().time() > deadline:
                raise InvokeError(f"scheduler {self.scheduler_address} unreachable")
            await asyncio.sleep(0.1)

    async def cluster_state(self) -> list[p.Stats]:
        reply = await self._scheduler_request(p.GetStats(0))
        return reply.workers if isinstance(reply, p.ClusterState) else []

    # -- workers ---------------------------------------------------------------------------------

    async def _channel(self, wid: str, timeout: float | None = None) -> RpcChannel:
        """The connection to `wid`, dialling it if needed; concurrent callers share one dial. A caller waits
        at most `timeout` (its invoke's deadline): a worker that accepts but never completes the handshake
        (stopped, hung) must not hold a call for the handshake timeout. The dial itself goes on for later
        callers until it succeeds, fails, or the routing table drops the worker."""
        channel = self._channels.get(wid)
        if channel is not None and not channel.closed.is_set():
            return channel
        dialing = self._connecting.get(wid)
        if dialing is None:
            dialing = self._connecting[wid] = asyncio.create_task(self._connect(wid), name=f"dial-{wid}")
            dialing.add_done_callback(lambda task: self._dialed(wid, task))
        try:
            return await asyncio.wait_for(asyncio.shield(dialing), timeout)
        except TimeoutError:
            raise TimeoutError(f"worker {wid} did not complete a connection within {timeout:.1f}s") from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if dialing.cancelled() and not (current is not None and current.cancelling()):
                raise ConnectionError(f"worker {wid} left the routing table while we dialled it") from None
            raise

    def _dialed(self, wid: str, task: asyncio.Task[RpcChannel]) -> None:
        if self._connecting.get(wid) is task:
            del self._connecting[wid]
        if not task.cancelled():
            task.exception()  # seen: the callers that waited re-raise it; one that gave up needs no warning

    async def _connect(self, wid: str) -> RpcChannel:
        info = self.workers.get(wid)
        if info is None:
            raise ConnectionError(f"worker {wid} is not in the routing table")
        channel = await dial(info.address, self.token, "frontend", self.client_id)
        try:
            await self._share_memory(wid, info, channel)
        except BaseException:
            await channel.close()
            raise
        self._channels[wid] = channel
        self._known[wid] = set()  # a new connection may be a restarted worker
        return channel

    async def _share_memory(self, wid: str, info: p.WorkerInfo, channel: RpcChannel) -> None:
        """Offer a worker on this host a shared-memory region for the connection; it decides."""
        if not self.shm_slots or (info.node and info.node != socket.gethostname()):
            log.info("worker %s at %s: invokes over the socket (%s)", wid, info.address,
                     "shared memory is off" if not self.shm_slots else f"on another host, {info.node}")
            return
        try:
            region = shm.OfferedRegion.create(self.shm_slots, self.shm_slot_bytes)
        except OSError as exc:
            log.warning("worker %s: invokes over the socket (no shared memory here: %s)", wid, exc)
            return
        caller = None
        if self.call_ring:
            try:
                caller = ring.RingCaller.create(region)
            except (OSError, ValueError) as exc:
                log.warning("worker %s: no call ring (%s)", wid, exc)
        try:
            reply = await channel.request(region.offer(ring=caller is not None), timeout=10)
        finally:
            region.unlink()  # mapped on both sides (or refused): nothing to leak from here on
            ring.RingCaller.unlink_paths(region.path)
        if caller is not None and not (isinstance(reply, p.Ok) and caller.accepted()):
            caller.close()
            caller = None
        if isinstance(reply, p.Ok):
            channel.conn.region = region
            if caller is not None:
                caller.start()
                channel.conn.ring = caller
            log.info("worker %s at %s: invokes through shared memory (%d slots of %d KiB), %s", wid, info.address,
                     region.slots, region.slot_bytes >> 10, "a call ring" if caller else "the socket as doorbell")
        else:
            log.info("worker %s at %s: invokes over the socket (%s)", wid, info.address,
                     getattr(reply, "message", type(reply).__name__))

    async def resolve(self, spec: p.FunctionSpec, exclude: set[str] = frozenset()) -> str:
        """A worker for the function: one of its replicas in the table at random (spreads load), else the
        scheduler's placement."""
        routed = self._routed(spec, exclude)
        if routed is not None:
            return routed
        reply = await self._scheduler_request(p.Place(0, spec, sorted(exclude)))
        if isinstance(reply, p.Error):
            raise InvokeError(reply.message)
        assert isinstance(reply, p.Placement)
        for wid in reply.worker_ids:
            self.routes.setdefault(spec.function_id, [])
            if wid not in self.routes[spec.function_id]:
                self.routes[spec.function_id].append(wid)
        usable = [w for w in reply.worker_ids if w not in exclude]
        if not usable:
            raise InvokeError(f"no worker available for {spec.function_id}")
        if any(w not in self.workers for w in usable):
            await asyncio.sleep(0.05)  # the routing push with the new worker is on its way
        return usable[0]

    def _routed(self, spec: p.FunctionSpec, exclude: set[str] = frozenset()) -> str | None:
        """One of the function's replicas in the routing table, at random (spreads load); None if it has none."""
        candidates = [w for w in self.routes.get(spec.function_id, []) if w not in exclude and w in self.workers]
        return random.choice(candidates) if candidates else None

    # -- invoke ------------------------------------------------------------------------------------

    async def invoke(self, calls: list[FunctionCall], meter: InvokeMeter | None = None) -> list[torch.Tensor]:
        """Run one layer's calls: one message per worker, all in flight at once; outputs in order."""
        outputs: list[torch.Tensor | None] = [None] * len(calls)
        todo = list(range(len(calls)))
        excluded: dict[int, set[str]] = {i: set() for i in todo}
        failures: dict[str, str] = {}  # worker -> why its calls failed: the cause the caller must see
        for attempt in range(MAX_ATTEMPTS):
            by_worker: dict[str, list[int]] = {}
            placed = {i: self._routed(calls[i].function, excluded[i]) for i in todo}
            unplaced = [i for i, wid in placed.items() if wid is None]
            if unplaced:  # a cold layer's functions are placed in one round trip, not one after another
                try:
                    wids = await asyncio.gather(*(self.resolve(calls[i].function, excluded[i]) for i in unplaced))
                except InvokeError as exc:
                    raise InvokeError(_with_causes(str(exc), failures)) from None
                placed.update(zip(unplaced, wids))
            for i in todo:
                by_worker.setdefault(placed[i], []).append(i)
            if len(by_worker) == 1:  # no task to gather: the message leaves now, not on the loop's next turn
                ((wid, idx),) = by_worker.items()
                try:
                    results: list = [await self._invoke_on(wid, [calls[i] for i in idx], meter)]
                except Exception as exc:
                    results = [exc]
            else:
                results = await asyncio.gather(
                    *(self._invoke_on(wid, [calls[i] for i in idx], meter) for wid, idx in by_worker.items()),
                    return_exceptions=True,
                )
            todo = []
            for (wid, idx), result in zip(by_worker.items(), results):
                if isinstance(result, BaseException):
                    if not isinstance(result, (ConnectionError, InvokeError, OSError, TimeoutError)):
                        raise result
                    log.warning("calls on %s failed (%r); retrying elsewhere", wid, result)
                    failures[wid] = str(result) or type(result).__name__
                    self._forget(wid, result)
                    if not isinstance(result, InvokeError):  # no room or a broken block is not the worker's fault
                        self._report(wid, ok=False, reason=type(result).__name__)
                    for i in idx:
                        excluded[i].add(wid)
                    todo.extend(idx)
                else:
                    for i, out in zip(idx, result):
                        outputs[i] = out
            if not todo:
                return outputs  # type: ignore[return-value]
            self.stats.retries += 1
            await asyncio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # jitter
        raise InvokeError(_with_causes(f"{len(todo)} calls failed on every worker tried", failures))

    def invoke_warm(self, calls: list[FunctionCall], meter: InvokeMeter | None = None) -> list[torch.Tensor] | None:
        """`invoke` without the event loop, for the frontend's compute thread between two trunk halves: when
        every call's function is placed on a worker of this host that knows it and serves a synchronous call
        ring, the calls go through the rings (`RingCaller.post_sync`, `wait_sync`) and this returns their
        outputs. None when any of that is not so, or a worker answers anything but a result (a block went
        cold, a failure, no answer in time): `invoke` then does it all, loading, retrying and reporting."""
        groups = self._warm_groups(calls)
        if groups is None:
            return None
        posted = []  # (worker, call indices, rows, caller, region, slot)
        complete = True
        for wid, idx, caller, region in groups:
            mine = [calls[i] for i in idx]
            rows = [c.x.shape[0] for c in mine]
            out_nbytes = sum(rows) * mine[0].x.shape[-1] * max(_itemsize(c.function.dtype) for c in mine)
            placed = region.place([c.x for c in mine], [c.experts for c in mine], out_nbytes)
            if placed is None:
                complete = False
                break
            x, e, out_offset = placed
            slot = region.slot_of(out_offset)
            try:
                sent = caller.post_sync(slot, [c.function.function_id for c in mine], rows, x, e, out_nbytes)
            except ConnectionError:  # the loop closed the ring since `_warm_groups` looked: nothing was posted
                sent = False
            if not sent:
                region.release(slot)
                complete = False
                break
            posted.append((wid, idx, rows, caller, region, slot))
        answers = []
        for wid, idx, _, caller, _, slot in posted:  # every posted slot is waited for, come what may
            try:
                answers.append(caller.wait_sync(slot, self.deadline_s(wid, [calls[i] for i in idx])))
            except (ConnectionError, TimeoutError) as exc:  # `invoke` meets the same and drops the connection
                log.debug("a synchronous call to %s through the ring failed (%r): invoke takes it", wid, exc)
                answers.append(None)  # the slot stays lent: the worker may still write it
        if not complete or any(a is None or a[0] != ring.DONE or a[2] is None for a in answers):
            for (_, _, _, _, region, slot), answer in zip(posted, answers):
                if answer is not None:
                    region.release(slot)
            return None
        outputs: list[torch.Tensor | None] = [None] * len(calls)
        for (wid, idx, rows, _, region, slot), (_, compute_s, dtype, nbytes) in zip(posted, answers):
            output = region.view(region.output_at(slot), nbytes)
            region.release(slot)  # the output view keeps the slot taken while it lives
            self.stats.shm_messages += 1
            self.stats.ring_messages += 1
            self.stats.sync_messages += 1
            reply = p.Result(0, output.view(dtype).view(sum(rows), -1), 0, 0.0, compute_s)
            for i, out in zip(idx, self._settled(wid, len(idx), rows, reply, meter)):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def _warm_groups(self, calls: list[FunctionCall]) -> list[tuple[str, list[int], ring.RingCaller, shm.OfferedRegion]] | None:
        """The calls by worker, with each worker's synchronous ring and region; None unless all can go so."""
        by_worker: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            wid = self._routed(call.function)
            if wid is None:
                return None
            by_worker.setdefault(wid, []).append(i)
        groups = []
        for wid, idx in by_worker.items():
            channel = self._channels.get(wid)
            if channel is None or channel.closed.is_set() or channel.conn.ring is None:
                return None
            known = self._known.get(wid, ())
            if not channel.conn.ring.synchronous or any(calls[i].function.function_id not in known for i in idx):
                return None
            groups.append((wid, idx, channel.conn.ring, channel.conn.region))
        return groups

    def prefetch(self, spec: p.FunctionSpec) -> None:
        """Have a worker load `spec` now, without waiting: a cold call that comes later shares the load."""
        if spec.function_id in self._prefetching:
            return
        task = asyncio.create_task(self._prefetch(spec))
        self._prefetching[spec.function_id] = task
        task.add_done_callback(lambda _: self._prefetching.pop(spec.function_id, None))

    async def _prefetch(self, spec: p.FunctionSpec) -> None:
        try:
            wid = await self.resolve(spec)
            channel = await self._channel(wid)
            reply = await channel.request(p.Load(0, spec), timeout=self.deadline_min_s + spec.nbytes / LOAD_FLOOR_BYTES_S)
            if isinstance(reply, p.Ok):
                self.stats.prefetches += 1
        except Exception as exc:  # a hint that failed costs nothing but this line
            log.debug("prefetching %s failed: %r", spec.function_id, exc)

    def _report(self, wid: str, ok: bool, reason: str = "") -> None:
        """Count an outcome on `wid`; a failure goes to the scheduler at once, with the successes
        before it, so it can tell a worker that heartbeats but does not answer (gray failure)."""
        counts = self._outcomes.setdefault(wid, [0, 0])
        counts[0 if ok else 1] += 1
        channel = self._scheduler
        if ok or channel is None or channel.closed.is_set():
            return
        channel.conn.send(p.WorkerReport(wid, counts[0], counts[1], reason))
        self._outcomes[wid] = [0, 0]

    def deadline_s(self, wid: str, calls: list[FunctionCall]) -> float:
        """How long one message of `calls` may take on `wid` before it counts as lost."""
        rows = sum(c.x.shape[0] for c in calls)
        compute = self._row_cost.get(wid, 0.0) * max(rows, 1)
        cold = sum(c.function.nbytes for c in calls) / LOAD_FLOOR_BYTES_S
        return max(self.deadline_min_s, self.deadline_factor * compute) + cold

    def _forget(self, wid: str, why: BaseException) -> None:
        # A connection whose reply did not come in time may be half-open (a partition): dial anew.
        if isinstance(why, (ConnectionError, OSError, TimeoutError)):
            channel = self._channels.pop(wid, None)
            if channel is not None:
                asyncio.create_task(channel.close())

    async def _invoke_on(self, wid: str, calls: list[FunctionCall], meter: InvokeMeter | None) -> list[torch.Tensor]:
        deadline = self.deadline_s(wid, calls)
        channel = await self._channel(wid, deadline)  # a dial counts against the same deadline as the reply
        known = self._known.setdefault(wid, set())
        ids = [c.function.function_id for c in calls]
        rows = [c.x.shape[0] for c in calls]
        specs = {c.function.function_id: c.function for c in calls if c.function.function_id not in known}
        reply = await self._send_invoke(channel, calls, ids, rows, list(specs.values()), deadline)
        if isinstance(reply, p.Error) and reply.code == "unknown_function":  # it forgot (restart): tell it all
            known.clear()
            specs = {c.function.function_id: c.function for c in calls}
            reply = await self._send_invoke(channel, calls, ids, rows, list(specs.values()), deadline)
        if isinstance(reply, p.Result):
            known.update(specs)
        if isinstance(reply, p.Error):
            if reply.code in RETRYABLE:
                raise InvokeError(reply.message)  # the caller names the worker
            raise RuntimeError(f"worker {wid} rejected the call: {reply.code}: {reply.message}")
        assert isinstance(reply, p.Result)
        return self._settled(wid, len(calls), rows, reply, meter)

    def _settled(self, wid: str, calls: int, rows: list[int], reply: p.Result,
                 meter: InvokeMeter | None) -> list[torch.Tensor]:
        """A worker's Result counted (its cost per row, the stats, the caller's meter): the outputs per call."""
        per_row = reply.compute_s / max(1, sum(rows))
        old = self._row_cost.get(wid)
        self._row_cost[wid] = per_row if old is None else 0.8 * old + 0.2 * per_row
        self._report(wid, ok=True)
        stats = self.stats
        stats.invocations += calls
        stats.messages += 1
        stats.cold_starts += reply.cold_starts
        stats.load_s += reply.load_s
        stats.compute_s += reply.compute_s
        stats.per_worker[wid] = stats.per_worker.get(wid, 0) + calls
        if meter is not None:
            meter.cold_starts += reply.cold_starts
            meter.compute_s += reply.compute_s
            meter.messages += 1
            meter.load_wait_s = max(meter.load_wait_s, reply.load_s)
        return list(reply.output.split(rows))

    async def _send_invoke(self, channel: RpcChannel, calls: list[FunctionCall], ids: list[str], rows: list[int],
                           specs: list[p.FunctionSpec], deadline: float) -> p.Message:
        """One invoke message and its reply; the tensors go through shared memory when they fit a free slot."""
        xs, experts = [c.x for c in calls], [c.experts for c in calls]
        region = channel.conn.region
        if region is not None:
            out_nbytes = sum(rows) * xs[0].shape[-1] * max(_itemsize(c.function.dtype) for c in calls)
            placed = region.place(xs, experts, out_nbytes)
            if placed is not None:
                x, e, out_offset = placed
                caller = channel.conn.ring
                if caller is not None and not specs:  # the worker knows every function: it may serve it warm
                    reply = await self._ring_invoke(caller, region, region.slot_of(out_offset), ids, rows, x, e,
                                                    out_nbytes, deadline)
                    if reply is not None:
                        return reply
                self.stats.shm_messages += 1  # from here to the send nothing awaits: the slot is never lost
                return await channel.request(p.Invoke(0, ids, rows, x, e, specs, out_offset, region.slot_bytes),
                                             timeout=deadline)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        e = experts[0] if len(experts) == 1 else torch.cat(experts)
        return await channel.request(p.Invoke(0, ids, rows, x, e, specs), timeout=deadline)

    async def _ring_invoke(self, caller: ring.RingCaller, region: shm.OfferedRegion, slot: int, ids: list[str],
                           rows: list[int], x: torch.Tensor, e: torch.Tensor, out_nbytes: int,
                           deadline: float) -> p.Message | None:
        """One invoke through the call ring: its Result (the output a view of the slot), an Error, or None
        when a block is cold (the caller sends the same slot through the socket, which loads it)."""
        answer = await caller.call(slot, ids, rows, x, e, out_nbytes, deadline)
        if answer is None or answer[0] == ring.COLD:
            return None
        state, compute_s, dtype, nbytes = answer
        if state == ring.DONE and dtype is not None:
            output = region.view(region.output_at(slot), nbytes)
            region.release(slot)  # the output view keeps the slot taken while it lives
            self.stats.shm_messages += 1
            self.stats.ring_messages += 1
            return p.Result(0, output.view(dtype).view(sum(rows), -1), 0, 0.0, compute_s)
        reason = caller.failure(slot, nbytes) if state == ring.FAILED else f"ring state {state}"
        region.release(slot)
        return p.Error(0, "bad_request", reason)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        if self._scheduler is not None:
            await self._scheduler.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _with_causes(message: str, failures: dict[str, str]) -> str:
    """An invoke's final error with what each worker tried said (a short read, a full budget): the cause."""
    if not failures:
        return message
    return f"{message}; the workers tried said: " + "; ".join(f"{wid}: {why}" for wid, why in failures.items())


def _itemsize(dtype: str) -> int:
    """Bytes per element of a FunctionSpec's dtype name (the dtype of its outputs)."""
    found = getattr(torch, dtype, None)
    return found.itemsize if isinstance(found, torch.dtype) else 8
