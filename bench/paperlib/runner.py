"""One measured run: start a setup, warm its trunks up, replay the schedule, sample, stop, summarise.

The window measured is the replay, from the first scheduled send to the last finished token.
The warm-up before it (one 2-token request per tenant) loads every frontend's trunk, so trunk
loading is not billed to whichever tenant comes first; expert functions are not preloaded (cold
starts are part of what is measured). Counters (cold starts, the tenants' ledgers) are read
before and after the window and subtracted.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from bench.paperlib import summary
from bench.paperlib.loadgen import RequestResult, replay, warm_up
from bench.paperlib.probe import ClusterProbe
from bench.paperlib.sampler import GpuMemory, ProcessSampler
from bench.paperlib.setups import SetupOptions, start_setup, tenant_usage
from bench.paperlib.workload import Request


@dataclass
class RunPlan:
    """What one run measures."""

    setup: str
    options: SetupOptions
    schedule: list[Request]
    tenants: list[str]
    warm_prompts: dict[str, list[int]]
    num_layers: int
    num_experts: int
    sample_interval_s: float = 0.5
    probe_interval_s: float = 1.0
    tail_s: float = 2.0  # keep sampling this long after the last token
    label: str = ""


def _usage_delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def run(plan: RunPlan, workdir: Path, log=print) -> dict:
    """Run `plan` and return its paper.json object (plus `token_ids`, the generated ids, for the calibration)."""
    t_start = time.monotonic()
    setup = start_setup(plan.setup, plan.tenants, plan.options, workdir)
    started_s = time.monotonic() - t_start
    gpu = GpuMemory.open() if plan.options.device.startswith("cuda") else None
    sampler = ProcessSampler(setup.root_pids(), plan.sample_interval_s, gpu).start()
    try:
        raw = asyncio.run(_measure(plan, setup))
        setup.check_alive()
    finally:
        samples = sampler.stop()
        setup.stop()
    results, window, probe, trunk, usage, counters = raw
    log(f"  {plan.setup}{' ' + plan.label if plan.label else ''}: {len(results)} requests in "
        f"{window.end - window.start:.1f}s (started in {started_s:.1f}s)")
    return _summarise(plan, setup.remote, results, window, samples, probe, trunk, usage, counters, started_s)


async def _measure(plan: RunPlan, setup):
    endpoints = setup.endpoints
    probe = ClusterProbe(setup, plan.probe_interval_s)
    await warm_up(endpoints, plan.warm_prompts)
    trunk = await asyncio.to_thread(probe.trunk_bytes)
    usage_before = {t: await asyncio.to_thread(tenant_usage, e) for t, e in endpoints.items()}
    if setup.remote:
        await probe.worker_stats()
    counters_before = probe.counters()
    probe.start()
    results, wall_start, duration = await replay(plan.schedule, endpoints,
                                                 timeout_s=max(300.0, 3 * plan.schedule[-1].at))
    window = summary.Window(wall_start, wall_start + duration)
    await asyncio.sleep(plan.tail_s)
    usage_after = {t: await asyncio.to_thread(tenant_usage, e) for t, e in endpoints.items()}
    if setup.remote:
        await probe.worker_stats()
    await probe.stop()
    counters = {k: v - counters_before.get(k, 0.0) for k, v in probe.counters().items()}
    usage = {t: _usage_delta(usage_before[t], usage_after[t]) for t in endpoints}
    return results, window, probe, trunk, usage, counters


def _summarise(plan: RunPlan, remote: bool, results: list[RequestResult], window: summary.Window, samples,
               probe: ClusterProbe, trunk: dict[str, int], usage: dict[str, dict], counters: dict[str, float],
               started_s: float) -> dict:
    duration = window.end - window.start
    total = {"setup": plan.setup, "label": plan.label, "options": plan.options.describe(),
             "startup_s": round(started_s, 2), "window_s": round(duration, 2)}
    total.update(summary.process_stats(samples, window))
    total.update(summary.residency_stats(probe.samples, window))
    total.update(summary.latency_stats(results, duration))
    total.update(summary.cold_ttft_stats(results, plan.options.keep_alive_s))
    total["gib_seconds"] = summary.gib_seconds(samples, window)
    total["trunk_bytes"] = sum(trunk.values())
    # Workers count their loads; in process, the frontends' ledgers count whole-model reloads.
    total["cold_starts"] = int(counters.get("cold_starts_disk", 0) + counters.get("cold_starts_host", 0)) \
        if remote else round(sum(u.get("cold_starts", 0) for u in usage.values()))
    total["evictions"] = {k.removeprefix("evictions_"): int(v) for k, v in counters.items()
                          if k.startswith("evictions_") and v}
    total["expert_invocations"] = sum(u.get("expert_invocations", 0) for u in usage.values())
    per_tenant = {}
    for tenant in plan.tenants:
        mine = [r for r in results if r.tenant == tenant]
        entry = summary.latency_stats(mine, duration)
        entry.update(summary.cold_ttft_stats(mine, plan.options.keep_alive_s))
        if samples and tenant in samples[-1].rss:  # the tenant has processes of its own
            entry.update({k: v for k, v in summary.process_stats(samples, window, tenant).items() if k != "samples"})
            entry["gib_seconds"] = summary.gib_seconds(samples, window, tenant)
        entry.update(summary.residency_stats(probe.samples, window, tenant))
        entry["cold_starts"] = usage.get(tenant, {}).get("cold_starts")
        entry["expert_invocations"] = usage.get(tenant, {}).get("expert_invocations")
        per_tenant[tenant] = entry
    total["per_tenant"] = per_tenant
    total["timeline"] = summary.timeline(samples, probe.samples, window)
    total["heat_map"] = summary.heat_map(probe.functions, probe.probes, plan.num_layers,
                                         plan.num_experts, plan.options.block_size) if remote else None
    total["token_ids"] = {r.key: r.token_ids for r in results}  # generated ids, for the calibration
    return total
