"""One measured run of the payoff benchmark: start a setup, replay the trace, account its weights.

The window is the replay, from the first scheduled send to the last finished token (plus a short tail).
Before it, one short request per tenant checks that every model serves (and loads it: every setup starts
the window warm and scales down from there). With `drop_page_cache`, the checkpoints' pages are dropped
from the page cache every half second during the window, so every reload reads the disk: the host with
no memory to spare for cached checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from bench.paperlib import summary
from bench.paperlib.loadgen import RequestResult, replay, warm_up
from bench.paperlib.sampler import ProcessSampler
from bench.paperlib.workload import Request
from bench.payofflib.deploy import SetupRun, start
from bench.payofflib.meter import WeightMeter, WeightSample, gib_seconds
from bench.payofflib.tenants import Deployment

TAIL_S = 2.0
logger = logging.getLogger("bench.payoff.measure")


def checkpoint_files(deployment: Deployment) -> list[Path]:
    return sorted({f for path in deployment.models.values() for f in Path(path).glob("*.safetensors")})


class PageCacheDropper:
    """Drops the page cache of `files` every `interval_s` in a thread (fadvise DONTNEED: clean pages go)."""

    def __init__(self, files: list[Path], interval_s: float = 0.5) -> None:
        self.files, self.interval_s = files, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-cache-dropper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for file in self.files:
                try:
                    fd = os.open(file, os.O_RDONLY)
                except OSError as exc:  # a file gone for a moment: the next round tries again
                    logger.warning("cannot drop the page cache of %s: %s", file, exc)
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def __enter__(self) -> PageCacheDropper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def cold_requests(results: list[RequestResult], model_of: dict[str, str], idle_s: float) -> set[str]:
    """Requests sent after their model had nothing in flight for at least the keep-alive: those that meet
    a model (or its functions) scaled to zero. By model, not tenant: shared tenants keep it warm for each other."""
    return summary.cold_requests(results, idle_s, group=lambda r: model_of[r.tenant])


def run(spec: SetupRun, deployment: Deployment, trace: list[Request], warm_prompts: dict[str, list[int]],
        workdir: Path, cores: int, drop_page_cache: bool = False, log=print) -> dict:
    """Run one setup over the trace; its object of payoff.json (with `token_ids` per request)."""
    started = time.monotonic()
    setup = start(spec, deployment, workdir, cores)
    startup_s = time.monotonic() - started
    sampler = ProcessSampler(setup.root_pids(), 1.0).start()
    files = checkpoint_files(deployment)
    try:
        results, window, weights = asyncio.run(_measure(setup, trace, warm_prompts, files, drop_page_cache))
        setup.check_alive()
    finally:
        processes = sampler.stop()
        setup.stop()
    out = summarise(spec, deployment, results, window, weights, processes, startup_s, drop_page_cache)
    log(f"  {spec.label}{' (page cache dropped)' if drop_page_cache else ''}: {out['completed']}/{out['requests']} "
        f"requests in {out['window_s']:.1f}s (started in {startup_s:.1f}s); weights "
        f"{out['gib_s']['weights_device'] or 0:.3f} GiB·s, TTFT p99 {out['ttft_p99_s'] or 0:.3f}s, "
        f"ITL p50 {(out['itl_p50_s'] or 0) * 1000:.1f}ms", flush=True)
    return out


async def _measure(setup, trace, warm_prompts, files, drop_page_cache):
    await warm_up(setup.endpoints, warm_prompts)
    meter = WeightMeter(setup, files).start()
    await asyncio.sleep(0)
    if drop_page_cache:
        with PageCacheDropper(files):
            results, wall_start, duration = await replay(trace, setup.endpoints, timeout_s=max(300.0, 3 * trace[-1].at))
    else:
        results, wall_start, duration = await replay(trace, setup.endpoints, timeout_s=max(300.0, 3 * trace[-1].at))
    await asyncio.sleep(TAIL_S)
    await meter.stop()
    return results, summary.Window(wall_start, wall_start + duration + TAIL_S), meter.samples


def summarise(spec: SetupRun, deployment: Deployment, results: list[RequestResult], window: summary.Window,
              weights: list[WeightSample], processes, startup_s: float, dropped: bool) -> dict:
    duration = window.end - window.start
    model_of = {t.name: t.model for t in deployment.tenants}
    out = {"setup": spec.setup, "keep_alive_s": spec.keep_alive_s, "label": spec.label,
           "page_cache": "dropped" if dropped else "kept", "startup_s": round(startup_s, 2),
           "window_s": round(duration, 2)}
    out.update(summary.latency_stats(results, duration))
    ok = [r for r in results if r.ok]
    out["ttft_samples_s"] = [r.ttft_s for r in ok if r.ttft_s is not None]  # for pooling repeats (repeats.py)
    out["itl_samples_s"] = [g for r in ok for g in r.itl_s]

    def integral(value) -> float | None:
        return gib_seconds(weights, window.start, window.end, value)

    out["gib_s"] = {
        "weights_device": integral(lambda s: s.weights_device),  # the headline: what computes, held
        "experts_device": integral(lambda s: s.expert_device),
        "trunk": integral(lambda s: s.trunk),
        "experts_host_cache": integral(lambda s: s.expert_host),
        "page_cache": integral(lambda s: s.page_cache),
        "process_rss": summary.gib_seconds(processes, window),  # weights + KV + the processes themselves
    }
    rss, w = out["gib_s"]["process_rss"], out["gib_s"]["weights_device"]
    out["gib_s"]["kv_and_process"] = rss - w if rss is not None and w is not None else None
    inside = [s for s in weights if window.start <= s.t <= window.end]
    out["weights_device_peak_bytes"] = max((s.weights_device for s in inside), default=None)
    cold = cold_requests(results, model_of, spec.keep_alive_s) if spec.setup != "always-on" else set()
    cold_ttft = [r.ttft_s for r in ok if r.key in cold and r.ttft_s is not None]
    out.update(cold_requests=len(cold), cold_percent=100.0 * len(cold) / max(1, len(results)),
               cold_ttft_p50_s=summary.percentile(cold_ttft, 50), cold_ttft_p99_s=summary.percentile(cold_ttft, 99))
    per_tenant = {}
    for t in deployment.tenants:
        mine = [r for r in results if r.tenant == t.name]
        stats = summary.latency_stats(mine, duration)
        per_tenant[t.name] = {"model": t.model, "requests": len(mine), "completed": stats["completed"],
                              "ttft_p50_s": stats["ttft_p50_s"], "ttft_p99_s": stats["ttft_p99_s"],
                              "cold_percent": 100.0 * sum(r.key in cold for r in mine) / max(1, len(mine))}
    out["per_tenant"] = per_tenant
    t0 = window.start
    out["timeline"] = {"t_s": [round(s.t - t0, 2) for s in inside],
                       "weights_device_bytes": [s.weights_device for s in inside],
                       "page_cache_bytes": [s.page_cache for s in inside]}
    out["token_ids"] = {r.key: r.token_ids for r in results}
    return out
