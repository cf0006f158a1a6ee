"""Keep-alive and eviction policies for expert functions.

Keep-alive decides how long an idle resident function stays before it scales to zero; eviction
decides which idle function gives way when a load needs room under the memory budget. Each is a
small class behind one Protocol, so a new policy is a new class and a factory name. Time is
always passed in (`now`, monotonic seconds): policies never read a clock, which keeps them
deterministic in tests and in trace-driven simulation.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

_MiB = float(1 << 20)


@dataclass(frozen=True)
class FunctionKey:
    """What a policy knows about an expert function: its id, its layer and its measured bytes."""

    function_id: str
    layer: int
    nbytes: int

    @property
    def layer_group(self) -> str:
        """The layer the block serves (`layer 3`). Function ids name content, not a model, so blocks of one
        layer index share a group whatever model they came from (their bytes may serve several)."""
        return f"layer {self.layer}"


# --- keep-alive ---------------------------------------------------------------------------


class KeepAlivePolicy(Protocol):
    """How long an idle resident function stays before it scales to zero."""

    def on_invoke(self, key: FunctionKey, now: float) -> None: ...
    def keep_alive_s(self, key: FunctionKey) -> float: ...
    def prewarm_at(self, key: FunctionKey, last_used: float) -> float | None: ...
    def expired(self, key: FunctionKey, last_used: float, now: float, in_flight: int) -> bool: ...


@dataclass
class FixedKeepAlive:
    """One TTL for every function (the default); `ttl_s=inf` keeps everything resident."""

    ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.ttl_s >= 0:  # also rejects NaN
            raise ValueError(f"ttl_s must be >= 0, got {self.ttl_s}")

    def on_invoke(self, key: FunctionKey, now: float) -> None:
        pass  # a fixed TTL needs no history

    def keep_alive_s(self, key: FunctionKey) -> float:
        return self.ttl_s

    def prewarm_at(self, key: FunctionKey, last_used: float) -> float | None:
        return None

    def expired(self, key: FunctionKey, last_used: float, now: float, in_flight: int) -> bool:
        return in_flight <= 0 and now - last_used >= self.ttl_s


@dataclass
class _IdleHistogram:
    counts: list[int]  # one slot per bin, then one for out-of-bounds idle times
    recent: deque[int] = field(default_factory=deque)  # the slot of each recorded idle time
    last_call: float | None = None
    decision: tuple[float, float | None] | None = None  # (keep-alive, prewarm offset); None = fallback


@dataclass
class HybridHistogramKeepAlive:
    """Per-function idle-time histogram policy after Shahrad et al., "Serverless in the Wild"
    (USENIX ATC'20), rescaled from minutes to seconds.

    Each gap between calls of at least `burst_gap_s` is an idle time, counted in one of `num_bins`
    bins of `bin_s` seconds (the paper: 1 min x 240); shorter gaps are calls within one burst
    (e.g. one expert on every decode step) and are not recorded. Only the `history` most recent
    idle times count, so a changed pattern takes over. With at least `min_samples` idle times, at
    most `max_oob_fraction` of them beyond the range, and a representative histogram (coefficient
    of variation of the bin counts >= `cv_threshold`, the paper's 2), keep-alive is the
    `tail_pct` (99th) percentile bin's upper edge x (1 + `margin`), and the pre-warm offset is the
    `head_pct` (5th) percentile bin's lower edge x (1 - `margin`): the function is unloaded once
    the burst is over and re-loaded at `prewarm_at`, before the predicted call. Pre-warm is used
    only when that unloaded window lasts `min_unload_s` or more (a reload must pay for itself).
    Otherwise (too few samples, flat histogram, too many out of bounds) it is the fixed `ttl_s`,
    the paper's fallback (we do not implement its ARIMA path for out-of-bounds idle times).
    """

    ttl_s: float = 60.0
    bin_s: float = 1.0
    num_bins: int = 240
    head_pct: float = 5.0
    tail_pct: float = 99.0
    margin: float = 0.10
    min_samples: int = 10
    cv_threshold: float = 2.0
    max_oob_fraction: float = 0.5
    burst_gap_s: float = 1.0
    min_unload_s: float = 5.0
    history: int = 1000
    _hist: dict[str, _IdleHistogram] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        FixedKeepAlive(self.ttl_s)  # validates ttl_s
        if not (self.bin_s > 0 and self.num_bins >= 1 and self.min_samples >= 1 and self.history >= 1):
            raise ValueError("bin_s, num_bins, min_samples and history must be positive")
        if not 0 <= self.head_pct <= self.tail_pct <= 100:
            raise ValueError("need 0 <= head_pct <= tail_pct <= 100")
        if not (0 <= self.margin < 1 and 0 <= self.max_oob_fraction <= 1 and self.burst_gap_s >= 0):
            raise ValueError("need 0 <= margin < 1, 0 <= max_oob_fraction <= 1, burst_gap_s >= 0")

    def on_invoke(self, key: FunctionKey, now: float) -> None:
        h = self._hist.get(key.function_id)
        if h is None:
            h = self._hist[key.function_id] = _IdleHistogram([0] * (self.num_bins + 1))
        if h.last_call is not None and now - h.last_call >= self.burst_gap_s:
            self._record(h, now - h.last_call)
        h.last_call = now

    def _record(self, h: _IdleHistogram, idle: float) -> None:
        b = min(int(idle // self.bin_s), self.num_bins)
        h.counts[b] += 1
        h.recent.append(b)
        if len(h.recent) > self.history:
            h.counts[h.recent.popleft()] -= 1
        h.decision = self._decide(h)  # once per idle period, not per query

    def _decide(self, h: _IdleHistogram) -> tuple[float, float | None] | None:
        counts, oob = h.counts[:-1], h.counts[-1]
        inside = len(h.recent) - oob
        if len(h.recent) < self.min_samples or oob > self.max_oob_fraction * len(h.recent) or not inside:
            return None
        mean = inside / self.num_bins
        std = math.sqrt(sum((c - mean) ** 2 for c in counts) / self.num_bins)
        if std / mean < self.cv_threshold:
            return None  # flat histogram: idle times are not predictable
        head = self._percentile_bin(counts, inside, self.head_pct) * self.bin_s * (1 - self.margin)
        tail = (self._percentile_bin(counts, inside, self.tail_pct) + 1) * self.bin_s * (1 + self.margin)
        prewarm = head if head - self.burst_gap_s >= self.min_unload_s else None
        return max(tail, self.burst_gap_s), prewarm

    @staticmethod
    def _percentile_bin(counts: list[int], total: int, pct: float) -> int:
        return bisect.bisect_left(list(itertools.accumulate(counts)), max(1, math.ceil(pct / 100 * total)))

    def keep_alive_s(self, key: FunctionKey) -> float:
        h = self._hist.get(key.function_id)
        return self.ttl_s if h is None or h.decision is None else h.decision[0]

    def prewarm_at(self, key: FunctionKey, last_used: float) -> float | None:
        h = self._hist.get(key.function_id)
        if h is None or h.decision is None or h.decision[1] is None:
            return None
        return last_used + h.decision[1]

    def expired(self, key: FunctionKey, last_used: float, now: float, in_flight: int) -> bool:
        """True when the function should not be resident: past keep-alive, or (with pre-warm)
        between the end of the burst and the pre-warm time. `last_used` is the last call, not a
        pre-warm load."""
        if in_flight > 0:
            return False
        idle = now - last_used
        h = self._hist.get(key.function_id)
        if h is None or h.decision is None:
            return idle >= self.ttl_s
        keep, prewarm = h.decision
        return (prewarm is not None and self.burst_gap_s <= idle < prewarm) or idle >= keep


# --- eviction -----------------------------------------------------------------------------


class EvictionPolicy(Protocol):
    """Which idle resident functions give way when a load needs room."""

    def on_load(self, key: FunctionKey, now: float, load_cost_s: float) -> None: ...
    def on_access(self, key: FunctionKey, now: float) -> None: ...
    def on_evict(self, key: FunctionKey) -> None: ...
    def victims(self, candidates: list[FunctionKey], need_bytes: int, now: float) -> list[FunctionKey]: ...


def _take(order: Iterable[FunctionKey], need_bytes: int) -> list[FunctionKey]:
    """The shortest prefix of `order` freeing `need_bytes` (all of it if none does), minus any
    victim the others make unnecessary, sparing the most protected first."""
    if need_bytes <= 0:
        return []
    chosen: list[FunctionKey] = []
    freed = 0
    for key in order:
        chosen.append(key)
        freed += key.nbytes
        if freed >= need_bytes:
            break
    else:
        return chosen
    keep = [True] * len(chosen)
    for i in range(len(chosen) - 1, -1, -1):
        if freed - chosen[i].nbytes >= need_bytes:
            keep[i] = False
            freed -= chosen[i].nbytes
    return [k for k, kept in zip(chosen, keep) if kept]


def _by_age(candidates: list[FunctionKey], loaded_at: dict[str, float], now: float,
            min_age_s: float) -> tuple[list[FunctionKey], list[FunctionKey]]:
    """(old enough to evict, loaded under min_age_s ago); unknown functions count as old."""
    old, young = [], []
    for k in candidates:
        (old if now - loaded_at.get(k.function_id, -math.inf) >= min_age_s else young).append(k)
    return old, young


@dataclass
class LRUEviction:
    """Least recently used first; functions loaded under `min_age_s` ago go last (anti-thrashing)."""

    min_age_s: float = 0.0
    _last: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _loaded: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def on_load(self, key: FunctionKey, now: float, load_cost_s: float) -> None:
        self._loaded[key.function_id] = self._last[key.function_id] = now

    def on_access(self, key: FunctionKey, now: float) -> None:
        self._last[key.function_id] = now

    def on_evict(self, key: FunctionKey) -> None:
        self._last.pop(key.function_id, None)
        self._loaded.pop(key.function_id, None)

    def victims(self, candidates: list[FunctionKey], need_bytes: int, now: float) -> list[FunctionKey]:
        old, young = _by_age(candidates, self._loaded, now, self.min_age_s)
        lru = lambda k: (self._last.get(k.function_id, -math.inf), k.function_id)
        return _take([*sorted(old, key=lru), *sorted(young, key=lru)], need_bytes)


@dataclass
class _Entry:
    key: FunctionKey
    cost_s: float
    loaded_at: float
    freq: float  # decayed hit count as of `t`
    t: float
    base: float  # the layer clock at the last hit


@dataclass
class FrequencyWeightedEviction:
    """GreedyDual-Size-Frequency per layer (FaasCache, Fuerst & Sharma, ASPLOS'21), with decay.

    Within a layer (`FunctionKey.layer_group`) a function's priority is
    `clock + freq x load_cost / MiB`: cheap-to-reload, large, rarely used blocks go first. `clock`
    is the layer's clock when the function was last hit; evicting a function inflates its layer's
    clock to the evicted priority, so entries not hit since age relative to newly hit ones. `freq`
    decays with half-life `half_life_s`, so yesterday's popular expert can leave. Across layers
    the policy is max-min fair: every token crosses every layer, so every layer needs its hot
    experts equally and the fair share is equal; the next victim comes from the layer holding the
    most resident bytes, ties broken by the lowest priority above its layer's clock. A flood of
    layer-0 traffic thus evicts layer 0's own coldest blocks before it can starve layer 5.
    Functions loaded under `min_age_s` ago are evicted only if the others do not free enough.
    """

    half_life_s: float = 120.0
    min_age_s: float = 0.0
    min_cost_s: float = 1e-3  # a block warm in host RAM still costs something to reload
    _entries: dict[str, _Entry] = field(default_factory=dict, init=False, repr=False)
    _clock: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _resident: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _scored: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.half_life_s > 0 and self.min_age_s >= 0 and self.min_cost_s > 0):
            raise ValueError("need half_life_s > 0, min_age_s >= 0, min_cost_s > 0")

    def _add(self, key: FunctionKey, now: float, cost_s: float, loaded_at: float, freq: float) -> _Entry:
        self._forget(key.function_id)
        g = key.layer_group
        self._resident[g] = self._resident.get(g, 0) + key.nbytes
        e = _Entry(key, max(cost_s, self.min_cost_s), loaded_at, freq, now, self._clock.get(g, 0.0))
        self._entries[key.function_id] = e
        return e

    def _forget(self, function_id: str) -> None:
        e = self._entries.pop(function_id, None)
        if e is not None:
            g = e.key.layer_group
            self._resident[g] -= e.key.nbytes
            if not self._resident[g]:
                del self._resident[g]

    def priority(self, key: FunctionKey, now: float) -> float:
        """The GDSF priority at `now`; the lowest in a layer is that layer's next victim."""
        e = self._entries[key.function_id]
        freq = e.freq * 0.5 ** (max(now - e.t, 0.0) / self.half_life_s)
        return e.base + freq * e.cost_s / max(e.key.nbytes / _MiB, 1e-9)

    def on_load(self, key: FunctionKey, now: float, load_cost_s: float) -> None:
        self._add(key, now, load_cost_s, loaded_at=now, freq=1.0)  # the load serves a call

    def on_access(self, key: FunctionKey, now: float) -> None:
        e = self._entries.get(key.function_id)
        if e is None:  # soft state: resident before we heard of it
            e = self._add(key, now, 0.0, loaded_at=-math.inf, freq=0.0)
        e.freq = e.freq * 0.5 ** (max(now - e.t, 0.0) / self.half_life_s) + 1
        e.t, e.base = now, self._clock.get(key.layer_group, 0.0)

    def on_evict(self, key: FunctionKey) -> None:
        self._forget(key.function_id)
        score = self._scored.pop(key.function_id, None)
        if score is not None:  # only capacity evictions age the layer, not keep-alive expiry
            g = key.layer_group
            self._clock[g] = max(self._clock.get(g, 0.0), score)

    def victims(self, candidates: list[FunctionKey], need_bytes: int, now: float) -> list[FunctionKey]:
        for k in candidates:
            if k.function_id not in self._entries:
                self._add(k, now, 0.0, loaded_at=-math.inf, freq=0.0)
        loaded = {k.function_id: self._entries[k.function_id].loaded_at for k in candidates}
        old, young = _by_age(candidates, loaded, now, self.min_age_s)
        resident = dict(self._resident)  # simulated as victims are picked
        scores: dict[str, float] = {}
        chosen = _take(itertools.chain(self._order(old, resident, scores, now),
                                       self._order(young, resident, scores, now)), need_bytes)
        self._scored = {k.function_id: scores[k.function_id] for k in chosen}
        return chosen

    def _order(self, keys: list[FunctionKey], resident: dict[str, int], scores: dict[str, float],
               now: float) -> Iterator[FunctionKey]:
        heaps: dict[str, list[tuple[float, float, str, FunctionKey]]] = {}
        for k in keys:
            p = self.priority(k, now)
            heaps.setdefault(k.layer_group, []).append((p, self._entries[k.function_id].t, k.function_id, k))
        for h in heaps.values():
            heapq.heapify(h)
        while heaps:
            g = max(heaps, key=lambda g: (resident.get(g, 0), self._clock.get(g, 0.0) - heaps[g][0][0]))
            p, _, fid, k = heapq.heappop(heaps[g])
            if not heaps[g]:
                del heaps[g]
            resident[g] = resident.get(g, 0) - k.nbytes
            scores[fid] = p
            yield k


# --- factories ----------------------------------------------------------------------------

KEEP_ALIVE_POLICIES: dict[str, type] = {"fixed": FixedKeepAlive, "adaptive": HybridHistogramKeepAlive}
EVICTION_POLICIES: dict[str, type] = {"lru": LRUEviction, "freq": FrequencyWeightedEviction}


def make_keep_alive(name: str, **kw: object) -> KeepAlivePolicy:
    """Build a keep-alive policy by name ("fixed", "adaptive"); both take `ttl_s`."""
    if name not in KEEP_ALIVE_POLICIES:
        raise ValueError(f"unknown keep-alive policy {name!r}; choose one of: {', '.join(KEEP_ALIVE_POLICIES)}")
    return KEEP_ALIVE_POLICIES[name](**kw)


def make_eviction(name: str, **kw: object) -> EvictionPolicy:
    """Build an eviction policy by name ("lru", "freq"); both take `min_age_s`."""
    if name not in EVICTION_POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of: {', '.join(EVICTION_POLICIES)}")
    return EVICTION_POLICIES[name](**kw)
