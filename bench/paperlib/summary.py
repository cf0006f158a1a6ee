"""Turn one run's raw observations into the per-setup object of paper.json."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from bench.paperlib.loadgen import RequestResult
from bench.paperlib.probe import FunctionUse, ResidencySample
from bench.paperlib.sampler import Sample


def percentile(values: list[float], pct: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * pct / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def latency_stats(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "output_tokens": tokens,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "e2e_p50_s": percentile([r.e2e_s for r in ok if r.e2e_s is not None], 50),
        "throughput_tok_s": tokens / duration_s if duration_s > 0 else None,
    }


def cold_requests(results: list[RequestResult], idle_s: float, group=lambda r: r.tenant) -> set[str]:
    """Requests sent after their tenant (or `group(request)`: its model, where tenants share one) was idle
    (nothing in flight) for at least `idle_s`, the keep-alive: the ones that meet a scaled-to-zero model or
    experts where a setup scales to zero. A function of the schedule and the finish times, so every setup is
    judged on (about) the same requests; the warm-up before the window counts as the first activity."""
    cold: set[str] = set()
    by_group: dict[str, list[RequestResult]] = {}
    for r in results:
        by_group.setdefault(group(r), []).append(r)
    for mine in by_group.values():
        busy_until = 0.0
        for r in sorted(mine, key=lambda r: r.scheduled_at):
            if r.scheduled_at - busy_until >= idle_s:
                cold.add(r.key)
            if r.finished_at is not None:
                busy_until = max(busy_until, r.finished_at)
    return cold


def cold_ttft_stats(results: list[RequestResult], idle_s: float) -> dict:
    """TTFT of the cold requests (see `cold_requests`)."""
    cold = cold_requests(results, idle_s)
    ttft = [r.ttft_s for r in results if r.ok and r.key in cold and r.ttft_s is not None]
    return {"cold_requests": len(cold), "cold_ttft_p50_s": percentile(ttft, 50), "cold_ttft_p99_s": percentile(ttft, 99)}


def gib_seconds(samples: list[Sample], window: Window, group: str | None = None) -> float | None:
    """Memory held over the window: the integral of RSS (trapezoids between samples), in GiB x seconds."""
    inside = [s for s in samples if window.holds(s.t)]
    if len(inside) < 2:
        return None
    rss = [s.rss.get(group, 0) if group else s.rss_total for s in inside]
    area = sum((b.t - a.t) * (x + y) / 2 for a, b, x, y in zip(inside, inside[1:], rss, rss[1:]))
    return area / 2**30


@dataclass
class Window:
    """The measured window, in wall time."""

    start: float
    end: float

    def holds(self, t: float) -> bool:
        return self.start <= t <= self.end


def process_stats(samples: list[Sample], window: Window, group: str | None = None) -> dict:
    inside = [s for s in samples if window.holds(s.t)] or samples[-1:]
    rss = [s.rss.get(group, 0) if group else s.rss_total for s in inside]
    cpu = [s.cpu.get(group, 0.0) if group else s.cpu_total for s in inside]
    out = {"rss_bytes_mean": _mean(rss), "rss_bytes_peak": max(rss, default=None),
           "cpu_percent_mean": _mean(cpu), "cpu_percent_peak": max(cpu, default=None), "samples": len(inside)}
    if group is None:  # the rest of the machine: the load generator, and other jobs that disturb a run
        out["other_cpu_percent_mean"] = _mean([max(0.0, s.machine_cpu - s.cpu_total) for s in inside])
    gpu = [s.gpu_bytes for s in inside if s.gpu_bytes is not None]
    if gpu and group is None:
        out.update(gpu_bytes_mean=_mean(gpu), gpu_bytes_peak=max(gpu))
    return out


def residency_stats(samples: list[ResidencySample], window: Window, tenant: str | None = None) -> dict:
    inside = [s for s in samples if window.holds(s.t)] or samples[-1:]
    values = [s.per_tenant.get(tenant, 0) if tenant else s.resident_bytes for s in inside]
    if tenant and not any(tenant in s.per_tenant for s in inside):
        return {"resident_expert_bytes_mean": None, "resident_expert_bytes_peak": None}
    return {"resident_expert_bytes_mean": _mean(values), "resident_expert_bytes_peak": max(values, default=None)}


def timeline(samples: list[Sample], residency: list[ResidencySample], window: Window) -> dict:
    """Series for the memory-over-time plot, seconds from the window's start."""
    return {
        "t_s": [round(s.t - window.start, 2) for s in samples],
        "rss_bytes": [s.rss_total for s in samples],
        "cpu_percent": [round(s.cpu_total, 1) for s in samples],
        "gpu_bytes": [s.gpu_bytes for s in samples] if any(s.gpu_bytes is not None for s in samples) else None,
        "resident_t_s": [round(s.t - window.start, 2) for s in residency],
        "resident_expert_bytes": [s.resident_bytes for s in residency],
        "window_s": round(window.end - window.start, 2),
    }


def heat_map(functions: dict[str, FunctionUse], probes: int, num_layers: int, num_experts: int,
             block_size: int) -> dict | None:
    """Layer x expert matrices: fraction of probes resident (any tenant's copy) and hits of the
    function holding the expert (a block's hits are shown on each of its experts)."""
    if not functions or probes <= 0:
        return None
    resident = [[0.0] * num_experts for _ in range(num_layers)]
    hits = [[0] * num_experts for _ in range(num_layers)]
    for use in functions.values():
        if not 0 <= use.layer < num_layers:
            continue
        for e in range(use.first, min(num_experts, use.first + use.count)):
            resident[use.layer][e] = max(resident[use.layer][e], use.resident_samples / probes)
            hits[use.layer][e] += use.hits
    return {"resident_fraction": resident, "hits": hits, "block_size": block_size, "probes": probes}
