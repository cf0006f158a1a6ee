"""A worker's memory tiers for expert blocks: device <- host RAM cache <- safetensors on disk.

The device tier holds the blocks that can run, under a byte budget it never exceeds: a load
that needs room evicts idle blocks chosen by the eviction policy (never one with calls in
flight), and what cannot fit is refused with a clear error. Evicted blocks drop to the host
tier (pinned on CUDA, its own budget, LRU), so reloading a recently used block is a memory
copy instead of a file read. Concurrent cold calls of one block share a single load. Loads read
a few at a time (a disk needs several reads in flight to reach its bandwidth), a call's before any
load asked ahead of its call (a prefetch), earlier layers first; CPU blocks are packed for the
matmul later, when the worker is quiet or the block hot, so a cold call waits for the read alone.

On CPU the host tier is the same RAM as the device tier, and the page cache already keeps a
recently read checkpoint's bytes, so CPU workers run with no host tier unless asked. Memory a
block gives back must leave the process: glibc keeps freed medium-sized allocations (below its
dynamic mmap threshold, which rises to the size of the largest freed mmap'd chunk, up to 32 MiB)
in its heaps and arenas, so after blocks leave for good the worker asks it to return the free
pages (`malloc_trim`); on other libcs that is a no-op.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout, ExpertWeights, QuantizedExpertWeights
from faasmoe.model.config import MoEConfig, parse_dtype
from faasmoe.model.content import ContentMismatch, ProvenBlocks
from faasmoe.model.experts import BlockWeights, ExpertBlock, needs_packing, pack_experts
from faasmoe.model.host_memory import return_free_memory
from runtime.policies import EvictionPolicy, FunctionKey, KeepAlivePolicy
from runtime.protocol import FunctionSpec

log = logging.getLogger(__name__)


class NoMemory(RuntimeError):
    """A block that cannot be made resident within the budget."""


class LoadFailed(RuntimeError):
    """A block whose weights could not be read (remembered for a while, not retried forever)."""


class Forbidden(PermissionError):
    """A checkpoint outside every allowed model root: refused, whoever asked."""


FAILED_LOAD_MEMORY_S = 30.0
PACK_WAIT_S = 0.05  # how often deferred packing looks for a quiet moment
PACK_IDLE_S = 0.5  # a worker this long without calls or loads packs what it loaded
PACK_HOT_CALLS = 8  # ... and a block called this often is packed between calls, however busy the worker


@dataclass
class Resident:
    """A block on the device, with its use so far."""

    spec: FunctionSpec
    block: ExpertBlock
    key: FunctionKey
    loaded_at: float
    last_used: float
    source: str  # where the last load came from: "disk" | "host"
    load_s: float = 0.0
    hits: int = 0
    in_flight: int = 0

    @property
    def nbytes(self) -> int:
        return self.key.nbytes


@dataclass
class LoadStats:
    """Cumulative counts a worker reports (and exports as metrics)."""

    cold_starts: dict[str, int] = field(default_factory=lambda: {"disk": 0, "host": 0})
    evictions: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=lambda: {"disk": 0.0, "host": 0.0})


class HostCache:
    """Weights of recently evicted blocks in host memory, least recently used out first."""

    def __init__(self, budget_bytes: int, pin: bool) -> None:
        self.budget_bytes = budget_bytes
        self.pin = pin
        self._entries: OrderedDict[str, tuple[BlockWeights, float, FunctionSpec | None]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w, _, _ in self._entries.values())

    def __contains__(self, function_id: str) -> bool:
        return function_id in self._entries

    def ids(self) -> list[str]:
        return list(self._entries)

    def held(self) -> list[tuple[str, FunctionSpec | None, int]]:
        """(function id, its spec if known, bytes) of every block in this tier."""
        return [(fid, spec, w.nbytes) for fid, (w, _, spec) in self._entries.items()]

    def take(self, function_id: str) -> BlockWeights | None:
        entry = self._entries.pop(function_id, None)
        return None if entry is None else entry[0]

    def put(self, function_id: str, weights: BlockWeights, now: float, spec: FunctionSpec | None = None) -> None:
        if weights.nbytes > self.budget_bytes:
            return
        while self._entries and self.nbytes + weights.nbytes > self.budget_bytes:
            self._entries.popitem(last=False)
        self._entries[function_id] = (weights, now, spec)

    def expire(self, older_than: float) -> list[str]:
        gone = [fid for fid, (_, at, _) in self._entries.items() if at < older_than]
        for fid in gone:
            del self._entries[fid]
        return gone


class LoadSlot:
    """One load's turn to read; `release` it once the bytes are in (again is a no-op)."""

    def __init__(self, slots: LoadSlots) -> None:
        self._slots: LoadSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.give()
            self._slots = None


class LoadSlots:
    """At most `slots` loads read at once; the waiting ones start in priority order (lowest first), and
    a waiting load can be moved up: a call that now needs what was asked ahead of time goes first.
    Loads ahead of their call (priority (1, ...)) leave `reserved` slots to calls, so a call's first
    load starts at once even while prefetches fill the disk."""

    def __init__(self, slots: int, reserved: int = 1) -> None:
        self.free = slots
        self.reserved = max(0, min(reserved, slots - 1))
        self._heap: list[tuple[tuple[int, int], int, str]] = []  # (priority, entry, key); stale entries skipped
        self._waiting: dict[str, tuple[asyncio.Future[None], tuple[int, int], int]] = {}
        self._entries = itertools.count()

    async def take(self, key: str, priority: tuple[int, int]) -> LoadSlot:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = next(self._entries)
        self._waiting[key] = (future, priority, entry)
        heapq.heappush(self._heap, (priority, entry, key))
        self._dispatch()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # handed a slot just as it was cancelled: pass it on
                self.give()
            raise
        finally:
            self._waiting.pop(key, None)
        return LoadSlot(self)

    def promote(self, key: str, priority: tuple[int, int]) -> None:
        waiting = self._waiting.get(key)
        if waiting is not None and not waiting[0].done() and priority < waiting[1]:
            entry = next(self._entries)
            self._waiting[key] = (waiting[0], priority, entry)
            heapq.heappush(self._heap, (priority, entry, key))
            self._dispatch()

    def give(self) -> None:
        self.free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self._heap and self.free > 0:
            priority, entry, key = self._heap[0]
            waiting = self._waiting.get(key)
            if waiting is None or waiting[2] != entry or waiting[0].done():  # started, cancelled or moved up
                heapq.heappop(self._heap)
                continue
            if priority[0] > 0 and self.free <= self.reserved:
                return
            heapq.heappop(self._heap)
            self.free -= 1
            waiting[0].set_result(None)


def load_priority(spec: FunctionSpec, ahead: bool) -> tuple[int, int]:
    """A call's loads before any load asked ahead of its call; among those, earlier layers first
    (a cold model's pipeline reads its blocks in the order the forward pass needs them)."""
    return (1 if ahead else 0, spec.layer)


class ExpertStore:
    """The device tier: resident expert blocks under a budget, loaded on demand."""

    def __init__(
        self,
        device: torch.device,
        budget_bytes: int,
        host: HostCache,
        eviction: EvictionPolicy,
        keep_alive: Callable[[FunctionSpec], KeepAlivePolicy],
        max_parallel_loads: int = 4,
        on_change: Callable[[list[Resident], list[str], str], None] | None = None,
        model_roots: Sequence[str | Path] = (),
    ) -> None:
        self.device = device
        # Where checkpoints may be opened from (none given: anywhere). Resolved once, like every
        # asked-for path, so neither `..` nor a symlink leads out of them.
        self.model_roots = tuple(Path(root).resolve() for root in model_roots)
        self.budget_bytes = budget_bytes
        self.host = host
        self.eviction = eviction
        self.keep_alive = keep_alive
        self.on_change = on_change or (lambda loaded, evicted, reason: None)
        self.resident: dict[str, Resident] = {}
        # Calls through a ring (runtime.ring) take and give back blocks on their own thread: taking a block,
        # giving it back and dropping one are each done whole under this lock (the loop never awaits in it).
        self.lock = threading.RLock()
        self.stats = LoadStats()
        self._loading: dict[str, asyncio.Future[Resident]] = {}
        self._reserved = 0  # bytes of loads in progress
        self._load_slots = LoadSlots(max_parallel_loads)
        self._models: dict[str, tuple[CheckpointReader, MoEConfig]] = {}
        self._failed: dict[str, tuple[float, Exception]] = {}  # recent load failures: retry later, not forever
        self.proven = ProvenBlocks()  # blocks hashed and found right, by the files they were read from
        # Scaled to zero but predicted back (adaptive keep-alive): function -> (spec, reload at, last call).
        self.prewarms: dict[str, tuple[FunctionSpec, float, float]] = {}
        # CPU blocks load in the plain layout and are packed for the fast matmul afterwards (see _pack_loaded).
        self._unpacked: deque[str] = deque()
        self._packer: asyncio.Task[None] | None = None
        self._last_active = time.monotonic()  # the last call's end or load's

    # -- accounting ---------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(r.nbytes for r in self.resident.values())

    def model(self, path: str) -> tuple[CheckpointReader, MoEConfig]:
        """The checkpoint at `path`, opened once; opened anew when a file of it was replaced since (the open
        descriptors would go on reading the old file: weights nobody deployed any more)."""
        cached = self._models.get(path)
        if cached is not None and cached[0].replaced():
            # Not closed here: a load in another thread may be reading through it (its descriptors would be
            # reused); the old reader closes when the last load that holds it lets go.
            log.warning("checkpoint %s was replaced on disk: reading it anew", path)
            cached = None
        if cached is None:
            allowed = self.allowed_path(path)
            cached = self._models[path] = (CheckpointReader(allowed), MoEConfig.from_pretrained(allowed))
        return cached

    def allowed_path(self, path: str) -> Path:
        """`path` resolved, if it lies under a model root; raises Forbidden otherwise."""
        resolved = Path(path).resolve()
        if self.model_roots and not any(resolved.is_relative_to(root) for root in self.model_roots):
            log.warning("refused checkpoint %s (resolves to %s): outside the model roots %s", path, resolved,
                        ", ".join(map(str, self.model_roots)))
            raise Forbidden(f"model path {path!r} is outside this worker's allowed model roots")
        return resolved

    def block_bytes(self, spec: FunctionSpec) -> int:
        _, config = self.model(spec.model_path)
        return spec.count * config.expert_bytes(parse_dtype(spec.dtype))

    # -- acquire / release ----------------------------------------------------------------

    def try_acquire(self, function_id: str) -> Resident | None:
        """The resident block with one more call in flight, or None if it needs a load."""
        with self.lock:
            resident = self.resident.get(function_id)
            if resident is not None:
                resident.in_flight += 1
                resident.hits += 1
                self.eviction.on_access(resident.key, time.monotonic())
            return resident

    async def acquire(self, spec: FunctionSpec, ahead: bool = False) -> tuple[Resident, bool]:
        """The resident block for `spec` with one more call in flight; True when this call loaded it.
        `ahead`: a load asked before any call needs it (a prefetch): it waits behind the calls' loads
        and takes only free memory, never evicting a block for a guess."""
        fid = spec.function_id
        self.prewarms.pop(fid, None)  # it came back on its own
        resident = self.resident.get(fid)
        cold = False
        if resident is None:
            pending = self._loading.get(fid)
            if pending is not None:
                if not ahead:  # a call waits for it now
                    self._load_slots.promote(fid, load_priority(spec, ahead=False))
                resident = await asyncio.shield(pending)
            else:
                resident = await self._load(spec, ahead)
                cold = True
        with self.lock:
            resident.in_flight += 1
            resident.hits += 1
            self.eviction.on_access(resident.key, time.monotonic())
        return resident, cold

    def release(self, resident: Resident) -> None:
        with self.lock:
            now = time.monotonic()
            resident.in_flight -= 1
            resident.last_used = self._last_active = now
            self.keep_alive(resident.spec).on_invoke(resident.key, now)

    async def _load(self, spec: FunctionSpec, ahead: bool = False) -> Resident:
        fid = spec.function_id
        failed = self._failed.get(fid)
        if failed is not None and time.monotonic() - failed[0] < FAILED_LOAD_MEMORY_S:
            ago = f"{time.monotonic() - failed[0]:.0f}s ago"
            if isinstance(failed[1], ContentMismatch):
                raise ContentMismatch(f"{failed[1]} ({ago}; retried after {FAILED_LOAD_MEMORY_S:.0f}s)")
            raise LoadFailed(f"loading {spec.name or fid} failed {ago}: {failed[1]}")
        future: asyncio.Future[Resident] = asyncio.get_running_loop().create_future()
        self._loading[fid] = future
        try:
            nbytes = self.block_bytes(spec)
            slot = await self._load_slots.take(fid, load_priority(spec, ahead))
            try:
                self._make_room(nbytes, fid, evict=not ahead)
                self._reserved += nbytes
                try:
                    resident = await self._fetch(spec, nbytes, slot)
                finally:
                    self._reserved -= nbytes
            finally:
                slot.release()
            self.resident[fid] = resident
            self._last_active = time.monotonic()
            self.on_change([resident], [], "load")
            self._pack_later(resident)
            future.set_result(resident)
            return resident
        except Exception as exc:
            if not isinstance(exc, (NoMemory, Forbidden)):  # a refusal is an answer, not a failed read
                self._failed[fid] = (time.monotonic(), exc)
                if isinstance(exc, ContentMismatch):  # it says what is wrong as it is
                    log.error("refused to load %s: %s", spec.name or fid, exc)
                else:
                    exc = LoadFailed(f"loading {spec.name or fid} failed: {exc}")
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs a warning
            raise exc
        finally:
            del self._loading[fid]

    async def _fetch(self, spec: FunctionSpec, nbytes: int, slot: LoadSlot) -> Resident:
        """Read the block (from the host tier or the disk) in its load slot, then lay it out on the
        device with the slot given back: the next load reads while this one packs or copies."""
        start = time.perf_counter()
        cached = self.host.take(spec.function_id)
        source = "host" if cached is not None else "disk"
        try:
            if cached is None:
                cached = await asyncio.to_thread(self._read, spec)
        finally:
            slot.release()
        weights = await asyncio.to_thread(self._place, cached)
        seconds = time.perf_counter() - start
        self.stats.cold_starts[source] += 1
        self.stats.load_seconds[source] += seconds
        key = FunctionKey(spec.function_id, spec.layer, weights.nbytes)
        now = time.monotonic()
        self.eviction.on_load(key, now, seconds)
        log.info("loaded %s (%s) from %s in %.1f ms (%d bytes)", spec.name or "?", spec.function_id[:12], source,
                 seconds * 1e3, nbytes)
        return Resident(spec, ExpertBlock(spec.layer, spec.first, weights), key, now, now, source, seconds)

    def _read(self, spec: FunctionSpec) -> ExpertWeights | QuantizedExpertWeights:
        """Runs in a thread: the block's bytes from the checkpoint (into pinned memory on CUDA), hashed as
        they come in and refused unless they are what the function's content digest names. A block this
        worker proved before, read again from files with the same identities (not written to since: their
        ctime would have moved), is not hashed twice: a reload after scale to zero costs its read alone."""
        if not spec.content:
            raise ContentMismatch(f"{spec.name or spec.function_id} names no content digest: this worker "
                                  "serves only blocks it can verify")
        reader, config = self.model(spec.model_path)
        layout = ExpertLayout(reader, config)
        dtype, pin = parse_dtype(spec.dtype), self.device.type == "cuda"

        def source() -> tuple:
            return (spec.model_path, spec.layer, spec.first, spec.count,
                    layout.block_identities(spec.layer, spec.first, spec.count))

        before = source()
        if self.proven.proven(spec.content, before):
            weights = layout.load_block(spec.layer, spec.first, spec.count, dtype, pin_memory=pin)
            if source() == before:
                return weights
            # written to while we read it: prove what is there now
        weights = layout.load_block(spec.layer, spec.first, spec.count, dtype, pin_memory=pin, expect=spec.content)
        if source() == before:
            self.proven.add(spec.content, before)
        return weights

    def _place(self, cached: BlockWeights) -> BlockWeights:
        """Runs in a thread: the block on the device (on CPU it is there, packed later)."""
        if self.device.type == "cpu":
            return cached
        if isinstance(cached, QuantizedExpertWeights):  # a few tensors a matrix; they stay quantized there too
            moved = cached.to(self.device)
            torch.cuda.current_stream(self.device).synchronize()
            return moved
        assert isinstance(cached, ExpertWeights), "only CPU blocks are packed"
        moved = ExpertWeights(cached.gate_up.to(self.device, non_blocking=True),
                              cached.down.to(self.device, non_blocking=True))
        torch.cuda.current_stream(self.device).synchronize()
        return moved

    def _pack_later(self, resident: Resident) -> None:
        if self.device.type != "cpu" or not needs_packing(resident.block.weights):
            return
        self._unpacked.append(resident.spec.function_id)
        if self._packer is None or self._packer.done():
            self._packer = asyncio.create_task(self._pack_loaded(), name="pack-loaded-blocks")

    @property
    def unpacked(self) -> int:
        """Resident blocks still waiting to be packed."""
        return len(self._unpacked)

    async def _pack_loaded(self) -> None:
        """Packing a block for the matmul's fastest layout costs the CPU about what reading it costs the
        disk: done with the loads, on 2 cores it slowed a cold layer's loads 2-4x, and done right after
        them, the frontend's next layer by as much. So a block is usable as soon as its bytes are in,
        and is packed here, one at a time (both copies are held only for that one), when the worker has
        been quiet for PACK_IDLE_S, or between calls once the block is hot (PACK_HOT_CALLS): a cold
        request does not pay for it, a steady stream soon runs packed. A call holds the block object
        it started with; the packed one replaces it for the calls after."""
        packed_any = False
        while self._unpacked:
            resident = self._next_to_pack(time.monotonic())
            if resident is None:
                await asyncio.sleep(PACK_WAIT_S)
                continue
            self._unpacked.remove(resident.spec.function_id)
            try:
                packed = await asyncio.to_thread(pack_experts, resident.block.weights)
            except Exception:  # the plain layout runs too, slower: keep it
                log.exception("packing %s failed; it runs unpacked", resident.spec.function_id)
                continue
            if packed is resident.block.weights:  # nothing to gain on this CPU or dtype
                self._unpacked.clear()
                break
            if self.resident.get(resident.spec.function_id) is resident:
                resident.block = ExpertBlock(resident.block.layer, resident.block.first, packed)
                packed_any = True
        if packed_any:
            self._return_memory()  # the plain copies' pages

    def _next_to_pack(self, now: float) -> Resident | None:
        for fid in list(self._unpacked):
            resident = self.resident.get(fid)
            if resident is None or not needs_packing(resident.block.weights):
                self._unpacked.remove(fid)  # gone, or packed already
        if self._loading or any(r.in_flight for r in self.resident.values()):
            return None
        idle = now - self._last_active >= PACK_IDLE_S
        return next((self.resident[f] for f in self._unpacked if idle or self.resident[f].hits >= PACK_HOT_CALLS), None)

    # -- eviction ---------------------------------------------------------------------------

    def _make_room(self, nbytes: int, for_id: str, evict: bool = True) -> None:
        with self.lock:
            if nbytes > self.budget_bytes:
                raise NoMemory(f"{for_id} needs {nbytes} bytes but the worker budget is {self.budget_bytes}")
            need = self.used_bytes + self._reserved + nbytes - self.budget_bytes
            if need <= 0:
                return
            if not evict:
                raise NoMemory(f"no free room for {for_id} ({nbytes} bytes) and a load ahead of its call evicts nothing")
            idle = [r.key for r in self.resident.values() if r.in_flight == 0]
            victims = self.eviction.victims(idle, need, time.monotonic())
            if sum(k.nbytes for k in victims) < need:
                raise NoMemory(
                    f"no room for {for_id} ({nbytes} bytes): {self.used_bytes} of {self.budget_bytes} bytes "
                    f"resident, {len(self.resident) - len(idle)} blocks busy"
                )
            for key in victims:
                self._drop(key.function_id, "memory")  # the load that follows reuses the memory: no trim

    def evict(self, function_id: str, reason: str) -> bool:
        """Drop an idle block to the host tier (or out, with none); False if it is absent or busy."""
        dropped = self._drop(function_id, reason)
        if dropped:
            self._return_memory()
        return dropped

    def _return_memory(self) -> None:
        if self.device.type == "cpu":  # CUDA memory goes back to torch's caching allocator, by design
            return_free_memory()

    def _drop(self, function_id: str, reason: str) -> bool:
        with self.lock:
            resident = self.resident.get(function_id)
            if resident is None or resident.in_flight > 0:
                return False
            del self.resident[function_id]
            self.eviction.on_evict(resident.key)
        weights = resident.block.weights
        if weights.nbytes <= self.host.budget_bytes:  # else the block leaves every tier
            if isinstance(weights, QuantizedExpertWeights) and self.device.type != "cpu":
                weights = weights.to("cpu")
            elif isinstance(weights, ExpertWeights) and self.device.type != "cpu":
                pin = self.host.pin
                weights = ExpertWeights(weights.gate_up.to("cpu").pin_memory() if pin else weights.gate_up.cpu(),
                                        weights.down.to("cpu").pin_memory() if pin else weights.down.cpu())
            self.host.put(function_id, weights, time.monotonic(), resident.spec)
        self.stats.evictions[reason] = self.stats.evictions.get(reason, 0) + 1
        self.on_change([], [function_id], reason)
        log.info("evicted %s (%s)", function_id, reason)
        return True

    def expire(self, now: float, host_ttl_s: float) -> list[str]:
        """Scale idle blocks to zero by their keep-alive; drop host copies older than host_ttl_s."""
        with self.lock:
            expired = [fid for fid in list(self.resident) if self._expire_one(fid, now)]
        if self.host.expire(now - host_ttl_s) or expired:
            self._return_memory()
        return expired

    def _expire_one(self, fid: str, now: float) -> bool:
        r = self.resident[fid]
        policy = self.keep_alive(r.spec)
        if not (policy.expired(r.key, r.last_used, now, r.in_flight) and self._drop(fid, "keep_alive")):
            return False
        at = policy.prewarm_at(r.key, r.last_used)
        if at is not None and at > now:
            self.prewarms[fid] = (r.spec, at, r.last_used)
        return True

    def due_prewarms(self, now: float) -> list[tuple[FunctionSpec, float]]:
        """Functions whose predicted next call is close: (spec, their last real call)."""
        due = [(spec, last) for fid, (spec, at, last) in self.prewarms.items()
               if at <= now and fid not in self.resident and fid not in self._loading]
        for spec, _ in due:
            del self.prewarms[spec.function_id]
        return due

    async def prewarm(self, spec: FunctionSpec, last_call: float) -> None:
        """Load ahead of a predicted call; the keep-alive still counts from the last real call."""
        if spec.function_id in self.resident or spec.function_id in self._loading:
            return
        resident = await self._load(spec, ahead=True)
        resident.last_used = last_call
