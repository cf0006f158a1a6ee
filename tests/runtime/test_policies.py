"""Keep-alive and eviction policies: deterministic, every call gets an explicit `now`."""

from __future__ import annotations

import math
import random

import pytest

from runtime.policies import (
    FixedKeepAlive,
    FrequencyWeightedEviction,
    FunctionKey,
    HybridHistogramKeepAlive,
    LRUEviction,
    make_eviction,
    make_keep_alive,
)

MiB = 1 << 20


def key(layer: int, block: int, nbytes: int = 10 * MiB, model: str = "m") -> FunctionKey:
    return FunctionKey(f"{model}/{layer}/{block}", layer, nbytes)


def test_a_function_key_groups_by_layer_whatever_its_model() -> None:
    assert key(3, 1, model="a").layer_group == key(3, 0, model="b").layer_group != key(2, 1).layer_group


# --- keep-alive ---------------------------------------------------------------------------


def test_fixed_ttl_expires_only_when_idle() -> None:
    p, k = FixedKeepAlive(ttl_s=10.0), key(0, 0)
    assert p.keep_alive_s(k) == 10.0 and p.prewarm_at(k, 0.0) is None
    assert not p.expired(k, last_used=100.0, now=109.9, in_flight=0)
    assert p.expired(k, last_used=100.0, now=110.0, in_flight=0)
    assert not p.expired(k, last_used=100.0, now=10_000.0, in_flight=1)


def test_fixed_ttl_inf_is_always_on_and_bad_ttl_rejected() -> None:
    assert not FixedKeepAlive(math.inf).expired(key(0, 0), 0.0, 1e12, 0)
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="ttl_s"):
            FixedKeepAlive(bad)


def periodic(p: HybridHistogramKeepAlive, k: FunctionKey, n: int, period: float, jitter: float,
             burst: int = 1, seed: int = 0) -> float:
    """Call `k` in n bursts `period` ± jitter apart (each burst `burst` calls 20 ms apart);
    returns the time of the last call."""
    rng, t = random.Random(seed), 0.0
    for _ in range(n):
        t += period + rng.uniform(-jitter, jitter)
        for i in range(burst):
            p.on_invoke(k, t + 0.02 * i)
    return t + 0.02 * (burst - 1)


def test_adaptive_learns_periodic_pattern() -> None:
    p, k = HybridHistogramKeepAlive(ttl_s=600.0), key(2, 0)
    last = periodic(p, k, n=50, period=30.0, jitter=0.5, burst=5)  # bursts must not pollute
    ka = p.keep_alive_s(k)
    assert 30.5 <= ka <= 36.0  # ~ p99 idle time x 1.1, not the 600 s fallback
    pre = p.prewarm_at(k, last)
    assert pre is not None and last + 20.0 < pre < last + 29.5  # a bit before the next call
    # resident during the burst's tail, unloaded until pre-warm, resident until keep-alive
    assert not p.expired(k, last, last + 0.5, 0)
    assert p.expired(k, last, last + 10.0, 0)
    assert not p.expired(k, last, pre + 0.1, 0)
    assert p.expired(k, last, last + ka + 1e-6, 0)
    assert not p.expired(k, last, last + 10.0, in_flight=2)


def test_adaptive_short_period_keeps_resident_without_prewarm() -> None:
    p, k = HybridHistogramKeepAlive(ttl_s=600.0), key(0, 0)
    last = periodic(p, k, n=40, period=3.0, jitter=0.2)
    assert p.prewarm_at(k, last) is None  # unloading for < min_unload_s would not pay
    assert 3.0 <= p.keep_alive_s(k) <= 5.0
    assert not p.expired(k, last, last + 2.0, 0)


def test_adaptive_falls_back_with_few_samples() -> None:
    p, k = HybridHistogramKeepAlive(ttl_s=120.0, min_samples=10), key(0, 0)
    last = periodic(p, k, n=5, period=30.0, jitter=0.1)
    assert p.keep_alive_s(k) == 120.0 and p.prewarm_at(k, last) is None
    assert not p.expired(k, last, last + 119.0, 0)
    assert p.expired(k, last, last + 120.0 + 1e-6, 0)
    assert p.keep_alive_s(key(9, 9)) == 120.0  # never seen


def test_adaptive_falls_back_for_flat_histogram() -> None:
    p, k = HybridHistogramKeepAlive(ttl_s=120.0), key(0, 0)
    rng, t = random.Random(1), 0.0
    for _ in range(800):  # idle times spread over the whole 240 s range: not predictable
        t += rng.uniform(1.0, 239.0)
        p.on_invoke(k, t)
    assert p.keep_alive_s(k) == 120.0 and p.prewarm_at(k, t) is None


def test_adaptive_falls_back_when_most_idle_times_out_of_bounds() -> None:
    p, k = HybridHistogramKeepAlive(ttl_s=120.0, num_bins=60), key(0, 0)
    periodic(p, k, n=30, period=300.0, jitter=5.0)
    assert p.keep_alive_s(k) == 120.0


def test_adaptive_follows_a_changed_pattern() -> None:
    p, k = HybridHistogramKeepAlive(history=20), key(0, 0)
    last = periodic(p, k, n=30, period=100.0, jitter=1.0)
    assert p.keep_alive_s(k) > 100.0
    for i in range(1, 21):
        p.on_invoke(k, last + 10.0 * i)
    assert p.keep_alive_s(k) < 15.0


# --- eviction -----------------------------------------------------------------------------


def test_lru_evicts_least_recent_first_and_stops_when_enough() -> None:
    p = LRUEviction()
    a, b, c = key(0, 0), key(0, 1), key(0, 2)
    for i, k in enumerate((a, b, c)):
        p.on_load(k, float(i), 1.0)
    p.on_access(a, 10.0)  # a is now the most recent
    assert p.victims([a, b, c], 10 * MiB, 11.0) == [b]
    assert p.victims([a, b, c], 15 * MiB, 11.0) == [b, c]
    assert p.victims([a, b, c], 100 * MiB, 11.0) == [b, c, a]  # cannot free enough: all
    assert p.victims([a, b, c], 0, 11.0) == []
    assert p.victims([a, c], 10 * MiB, 11.0) == [c]  # only idle candidates are considered
    p.on_evict(b)
    assert p.victims([a, b, c], 10 * MiB, 11.0) == [b]  # forgotten: evicted first


def test_victims_drop_ones_made_unnecessary() -> None:
    p = LRUEviction()
    small, big = key(0, 0, 1 * MiB), key(0, 1, 50 * MiB)
    p.on_load(small, 0.0, 1.0)
    p.on_load(big, 1.0, 1.0)
    assert p.victims([small, big], 40 * MiB, 2.0) == [big]


@pytest.mark.parametrize("name", ["lru", "freq"])
def test_min_age_protects_fresh_loads_unless_nothing_else_frees_enough(name: str) -> None:
    p = make_eviction(name, min_age_s=10.0)
    old, fresh = key(0, 0), key(0, 1)
    p.on_load(old, 0.0, 1.0)
    p.on_load(fresh, 95.0, 1.0)
    p.on_access(old, 98.0)  # LRU alone would pick `fresh`
    assert p.victims([old, fresh], 10 * MiB, 100.0) == [old]
    assert p.victims([old, fresh], 20 * MiB, 100.0) == [old, fresh]
    assert p.victims([fresh], 10 * MiB, 100.0) == [fresh]
    assert p.victims([old, fresh], 10 * MiB, 106.0) == [fresh]  # old enough now


@pytest.mark.parametrize("name, victim", [("freq", "once"), ("lru", "hot")])
def test_freq_keeps_popular_expert_over_once_used_recent_one(name: str, victim: str) -> None:
    p = make_eviction(name)
    keys = {"hot": key(3, 0), "once": key(3, 1)}
    p.on_load(keys["hot"], 0.0, 0.5)
    for t in range(1, 21):
        p.on_access(keys["hot"], float(t))
    p.on_load(keys["once"], 50.0, 0.5)
    assert p.victims(list(keys.values()), 10 * MiB, 60.0) == [keys[victim]]


def test_freq_prefers_evicting_cheap_large_blocks() -> None:
    p = FrequencyWeightedEviction()
    costly, cheap_big = key(1, 0, 10 * MiB), key(1, 1, 40 * MiB)
    p.on_load(costly, 0.0, 2.0)
    p.on_load(cheap_big, 0.0, 0.1)
    assert p.victims([costly, cheap_big], 1, 1.0) == [cheap_big]


def test_freq_popularity_decays() -> None:
    p = FrequencyWeightedEviction(half_life_s=60.0)
    yesterday, today = key(3, 0), key(3, 1)
    p.on_load(yesterday, 0.0, 0.5)
    for t in range(1, 100):
        p.on_access(yesterday, float(t))
    p.on_load(today, 1000.0, 0.5)
    p.on_access(today, 1001.0)
    assert p.victims([yesterday, today], 10 * MiB, 1002.0) == [yesterday]
    # without decay the 100 old hits would still win
    q = FrequencyWeightedEviction(half_life_s=1e12)
    q.on_load(yesterday, 0.0, 0.5)
    for t in range(1, 100):
        q.on_access(yesterday, float(t))
    q.on_load(today, 1000.0, 0.5)
    q.on_access(today, 1001.0)
    assert q.victims([yesterday, today], 10 * MiB, 1002.0) == [today]


def test_freq_keeps_layers_balanced_under_a_flood() -> None:
    p = FrequencyWeightedEviction()
    layer0 = [key(0, b) for b in range(8)]
    layer5 = [key(5, b) for b in range(4)]
    for k in layer5:
        p.on_load(k, 0.0, 0.5)  # used once, long ago
    for k in layer0:
        p.on_load(k, 10.0, 0.5)
    for t in range(11, 111):
        for k in layer0:
            p.on_access(k, float(t))
    v = p.victims(layer0 + layer5, 6 * 10 * MiB, 120.0)
    assert len(v) == 6
    assert sum(k.layer == 5 for k in v) <= 1  # plain GDSF would evict all four of layer 5
    assert sum(k.layer == 0 for k in v) >= 5


def test_freq_simulated_cache_never_starves_a_layer() -> None:
    """A worker holding 8 blocks; layer 0 is hammered, layer 5 sees a call now and then."""
    p, budget, resident = FrequencyWeightedEviction(), 8 * 10 * MiB, {}
    rng = random.Random(0)
    for step in range(2000):
        now = float(step)
        k = key(5, rng.randrange(4)) if step % 50 == 0 else key(0, rng.randrange(16))
        if k.function_id in resident:
            p.on_access(k, now)
        else:
            need = sum(r.nbytes for r in resident.values()) + k.nbytes - budget
            for v in p.victims(list(resident.values()), need, now):
                p.on_evict(v)
                del resident[v.function_id]
            p.on_load(k, now, 0.5)
            resident[k.function_id] = k
        assert sum(r.nbytes for r in resident.values()) <= budget
    assert any(r.layer == 5 for r in resident.values())
    assert sum(r.layer == 0 for r in resident.values()) <= 6


def test_freq_clock_ages_untouched_entries() -> None:
    p = FrequencyWeightedEviction(half_life_s=1e12)
    a, b, c = key(0, 0), key(0, 1), key(0, 2)
    p.on_load(a, 0.0, 0.9)
    p.on_load(b, 0.0, 0.5)
    p.on_access(b, 1.0)  # b: 2 hits x 0.5 s
    assert p.victims([a, b], 1, 2.0) == [a]
    p.on_evict(a)  # capacity eviction: the layer clock rises to a's priority
    p.on_load(c, 3.0, 0.5)  # c: 1 hit, but its priority starts from the inflated clock
    assert p.priority(c, 4.0) > p.priority(b, 4.0)
    assert p.victims([b, c], 1, 4.0) == [b]  # plain LFU would keep b (2 hits)


def test_freq_keep_alive_expiry_does_not_age_the_layer() -> None:
    p = FrequencyWeightedEviction(half_life_s=1e12)
    a, b = key(0, 0), key(0, 1)
    p.on_load(a, 0.0, 0.9)
    p.on_evict(a)  # expired, not chosen by victims(): no clock inflation
    p.on_load(b, 1.0, 0.5)
    assert p.priority(b, 1.0) == pytest.approx(0.5 / 10)


def test_factories() -> None:
    assert isinstance(make_keep_alive("fixed", ttl_s=5.0), FixedKeepAlive)
    assert make_keep_alive("adaptive", ttl_s=5.0).keep_alive_s(key(0, 0)) == 5.0
    assert isinstance(make_eviction("lru"), LRUEviction)
    assert isinstance(make_eviction("freq", min_age_s=1.0), FrequencyWeightedEviction)
    with pytest.raises(ValueError, match="'ttl'.*fixed, adaptive"):
        make_keep_alive("ttl")
    with pytest.raises(ValueError, match="'lfu'.*lru, freq"):
        make_eviction("lfu")
