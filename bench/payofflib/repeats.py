"""Several runs of one setup, pooled: the p99 of one run of ~500 requests is its 5 slowest, and it moved by half
between two runs of the same trace (whole-model K=1 s: 653 and 1010 ms), more than the effect the frontier reads.
Runs of the same label and page-cache condition become one: TTFT and ITL percentiles over every request of
every repeat, GiB·s and cold % averaged, each repeat's p99 kept so the spread shows. What only one run
describes (per-tenant stats, the memory timeline, cold-request latencies) is left out of the pooled entry rather
than shown for the first run alone."""

from __future__ import annotations

from bench.paperlib.summary import percentile

_PER_RUN_ONLY = ("per_tenant", "timeline", "cold_ttft_p50_s", "cold_ttft_p99_s", "e2e_p50_s", "throughput_tok_s",
                 "output_tokens", "cold_requests", "startup_s", "window_s", "weights_device_peak_bytes", "repeat")
_MEAN_GIB = ("weights_device", "experts_device", "trunk", "experts_host_cache", "page_cache", "process_rss",
             "kv_and_process")


def pool(runs: list[dict]) -> list[dict]:
    """`runs` (each with its samples under "ttft_samples_s" / "itl_samples_s") pooled per (label, page cache),
    in the order each first appeared."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["label"], r["page_cache"]), []).append(r)
    return [_pooled(group) if len(group) > 1 else group[0] for group in groups.values()]


def _pooled(group: list[dict]) -> dict:
    out = {k: v for k, v in group[0].items() if k not in _PER_RUN_ONLY}
    ttft = [t for r in group for t in r["ttft_samples_s"]]
    itl = [t for r in group for t in r["itl_samples_s"]]
    out.update(repeats=len(group), ttft_p99_per_repeat_s=[r["ttft_p99_s"] for r in group],
               ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
               itl_p50_s=percentile(itl, 50), itl_p99_s=percentile(itl, 99),
               ttft_samples_s=ttft, itl_samples_s=itl,
               requests=sum(r["requests"] for r in group), completed=sum(r["completed"] for r in group),
               failed=sum(r["failed"] for r in group),
               cold_percent=sum(r["cold_percent"] for r in group) / len(group))
    out["gib_s"] = {k: _mean([r["gib_s"].get(k) for r in group]) for k in group[0]["gib_s"] if k in _MEAN_GIB}
    return out


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)
