"""The cluster as JSON: one shape for the scheduler's `/cluster` and the frontend's `/admin/cluster`."""

from __future__ import annotations

from runtime import protocol as p


def worker_json(s: p.Stats, private: bool = True) -> dict:
    """A worker, its budget and what it holds on its device and in its host cache (resident_bytes: both); with `private`
    False, functions only one tenant uses count in the bytes but are not named."""
    device = [r for r in s.resident if r.tier == "device"]
    host = [r for r in s.resident if r.tier == "host"]
    named = device if private else [r for r in device if not _owned(r.function)]
    named_host = host if private else [r for r in host if not _owned(r.function)]
    device_bytes, host_bytes = sum(r.nbytes for r in device), int(s.counters.get("host_bytes", 0))
    return {
        "id": s.worker.worker_id, "pid": s.worker.pid, "address": s.worker.address, "node": s.worker.node,
        "device": s.worker.device, "budget_bytes": s.worker.budget_bytes,
        "host_budget_bytes": s.worker.host_budget_bytes,
        "resident_bytes": device_bytes + host_bytes,  # every tier counts: scaled to zero means both are 0
        "device_bytes": device_bytes,
        "host_cache_bytes": host_bytes,
        "resident_functions": sorted(r.function.function_id for r in named),  # on the device
        "host_functions": sorted(r.function.function_id for r in named_host),  # in the host cache only
    }


def _owned(fn: p.FunctionSpec) -> bool:
    """A function only one tenant's private models use, or one whose spec the worker no longer has
    (its id, a content digest, cannot tell whose it was: named to admins only)."""
    return bool(fn.owner) or fn.layer < 0


def workers_json(stats: list[p.Stats], private: bool = True) -> list[dict]:
    return [worker_json(s, private) for s in stats]
