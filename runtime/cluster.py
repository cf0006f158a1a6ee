"""The cluster as JSON: one shape for the scheduler's `/cluster` and the frontend's `/admin/cluster`."""

from __future__ import annotations

from runtime import protocol as p


def worker_json(s: p.Stats) -> dict:
    """A worker, its budget and what it holds on its device and in its host cache."""
    device = [r for r in s.resident if r.tier == "device"]
    return {
        "id": s.worker.worker_id, "pid": s.worker.pid, "address": s.worker.address, "node": s.worker.node,
        "device": s.worker.device, "budget_bytes": s.worker.budget_bytes,
        "resident_bytes": sum(r.nbytes for r in device),
        "host_cache_bytes": int(s.counters.get("host_bytes", 0)),
        "resident_functions": sorted(r.function.function_id for r in device),
    }


def workers_json(stats: list[p.Stats]) -> list[dict]:
    return [worker_json(s) for s in stats]
