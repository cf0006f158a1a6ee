"""Placement: cache-aware ranking, and a burst of new functions spread across workers."""

from __future__ import annotations

import random

from runtime.placement import CacheAwarePlacement, WorkerView


def test_prefers_device_then_host_then_room_then_fewest():
    policy = CacheAwarePlacement(random.Random(0))
    holder = WorkerView("holder", 100, device_ids={"f"}, used_bytes=90)
    host = WorkerView("host", 100, host_ids={"f"}, used_bytes=50)
    roomy = WorkerView("roomy", 100)
    full = WorkerView("full", 100, used_bytes=99)
    assert policy.choose("f", 10, [full, roomy, host, holder]) == ["holder"]
    assert policy.choose("f", 10, [full, roomy, host]) == ["host"]
    assert policy.choose("f", 10, [full, roomy]) == ["roomy"]
    assert policy.choose("f", 10, [full, roomy], exclude={"roomy"}) == ["full"]
    assert policy.choose("f", 1000, [full, roomy]) == []  # bigger than any budget


def test_pending_placements_spread_a_burst():
    policy = CacheAwarePlacement(random.Random(1))
    workers = [WorkerView("a", 100), WorkerView("b", 100)]
    for i in range(6):
        chosen = policy.choose(f"f{i}", 1, workers)[0]
        next(w for w in workers if w.worker_id == chosen).pending += 1
    assert [w.pending for w in workers] == [3, 3]
