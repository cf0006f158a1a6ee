"""Where a function should run: a cache-aware choice among the live workers.

Order of preference (DESIGN.md, "place like a cache-aware mesh"): a worker that holds the
block on its device, then one that still has it in its host tier (a reload is a copy), then
one with room for it, then the one with the fewest functions; ties are broken at random so
concurrent frontends do not pile onto one worker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class WorkerView:
    """What placement needs to know about one worker."""

    worker_id: str
    budget_bytes: int
    device_ids: set[str] = field(default_factory=set)
    host_ids: set[str] = field(default_factory=set)
    used_bytes: int = 0
    queue_depth: int = 0
    pending: int = 0  # functions placed here that have not reported loaded yet

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes


class CacheAwarePlacement:
    """Ranks workers for one function; `choose` returns the best `replicas` of them."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def rank(self, function_id: str, nbytes: int, worker: WorkerView) -> tuple:
        return (
            function_id not in worker.device_ids,
            function_id not in worker.host_ids,
            worker.free_bytes < nbytes,
            worker.queue_depth,
            len(worker.device_ids) + worker.pending,
            self.rng.random(),
        )

    def choose(self, function_id: str, nbytes: int, workers: list[WorkerView], exclude: set[str] = frozenset(),
               replicas: int = 1) -> list[str]:
        candidates = [w for w in workers if w.worker_id not in exclude and w.budget_bytes >= nbytes]
        candidates.sort(key=lambda w: self.rank(function_id, nbytes, w))
        return [w.worker_id for w in candidates[:replicas]]
