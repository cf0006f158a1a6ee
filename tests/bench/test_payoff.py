"""The payoff benchmark's arithmetic: the trace it replays, which requests count as cold, and how the
frontier and the headline ratio are read off (bench/payoff.py runs the servers; these check the reading)."""

from __future__ import annotations

import random
import statistics

import pytest

from bench.paperlib.loadgen import RequestResult
from bench.payofflib import frontier
from bench.payofflib.measure import cold_requests
from bench.payofflib.tenants import plan_tenants
from bench.payofflib.trace import TenantTraffic, arrivals, build_trace, geometric_rates


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_gamma_arrivals_have_the_rate_and_burstiness_asked(cv):
    times = arrivals(rate=0.5, cv=cv, duration_s=200_000, rng=random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(2.0, rel=0.1)
    assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.15)


def test_rates_span_a_hundredfold_and_tenants_alternate_shared_and_private():
    rates = geometric_rates(8)
    assert rates[0] == 1.0 and rates[-1] == pytest.approx(0.01) and rates == sorted(rates, reverse=True)
    plan = plan_tenants(8, {"python", "c", "man-en", "man-de", "man-es", "man-fr"})
    assert [private for _, _, private, _ in plan] == [True, False] * 4
    private_domains = [d for _, d, private, _ in plan if private]
    assert len(set(private_domains)) == 4  # every private tenant its own fine-tune


def test_more_fine_tunes_than_domains_are_versions_of_their_own_spread_over_the_rates():
    domains = {"python", "c", "man-en", "man-de", "man-es", "man-fr"}
    plan = plan_tenants(16, domains, fine_tunes=12)
    private = [i for i, (_, _, is_private, _) in enumerate(plan) if is_private]
    assert len(private) == 12 and [i for i in range(16) if i not in private] == [1, 5, 9, 13]
    tunes = [(domain, version) for _, domain, is_private, version in plan if is_private]
    assert len(set(tunes)) == 12  # no two tenants upload the same fine-tune
    assert max(version for _, version in tunes) == 1  # 6 domains here: the 7th tenant on is a second version
    with pytest.raises(ValueError, match="--fine-tunes 17"):
        plan_tenants(16, domains, fine_tunes=17)


def test_the_trace_is_seeded_real_text_of_each_tenants_domain():
    tenants = [TenantTraffic("a", "base", "python", 1.0, 1.0), TenantTraffic("b", "tune", "man-en", 0.01, 4.0)]
    streams = {"python": list(range(1000, 5000)), "man-en": list(range(9000, 9800))}
    trace = build_trace(tenants, streams, 60.0, seed=3)
    assert trace == build_trace(tenants, streams, 60.0, seed=3)
    assert [r.at for r in trace] == sorted(r.at for r in trace)
    assert any(r.tenant == "b" for r in trace)  # a rare tenant still sends
    for r in trace:
        stream = streams["python" if r.tenant == "a" else "man-en"]
        start = stream.index(r.prompt[0])
        assert list(r.prompt) == stream[start:start + len(r.prompt)]  # a contiguous window of the domain's text
    code = [len(r.prompt) for r in trace if r.tenant == "a"]
    assert statistics.median(code) > 200  # code: long prompts


def result(tenant: str, key: str, at: float, done: float) -> RequestResult:
    return RequestResult(tenant, key, at, ttft_s=0.1, finished_at=done)


def test_a_request_is_cold_when_its_model_idled_for_the_keep_alive_whoever_kept_it_busy():
    results = [result("a", "a#0", 0.0, 1.0), result("b", "b#0", 3.0, 4.0), result("a", "a#1", 4.5, 5.0),
               result("a", "a#2", 20.0, 21.0)]
    model_of = {"a": "base", "b": "base"}
    # The warm-up just before the window is the models' last activity; b kept the shared base warm for a#1.
    assert cold_requests(results, model_of, 5.0) == {"a#2"}
    assert cold_requests(results, {"a": "base", "b": "tune"}, 3.0) == {"b#0", "a#1", "a#2"}


def run(setup: str, k: float, p99: float, gib: float, failed: int = 0, cache: str = "kept") -> dict:
    label = setup if setup == "always-on" else f"{setup} K={k:g}s"
    return {"setup": setup, "keep_alive_s": k, "label": label, "page_cache": cache, "failed": failed,
            "ttft_p99_s": p99, "gib_s": {"weights_device": gib}}


def test_the_headline_compares_the_least_memory_each_setup_needs_at_the_tightest_slo_both_meet():
    runs = [run("always-on", float("inf"), 0.3, 10.0),
            run("whole-model", 1, 3.0, 2.0), run("whole-model", 15, 0.5, 6.0), run("whole-model", 300, 0.4, 9.0),
            run("faasmoe", 1, 2.0, 0.5), run("faasmoe", 15, 0.8, 1.5), run("faasmoe", 300, 0.6, 2.5),
            run("faasmoe", 5, 0.1, 0.1, failed=1),  # lost requests: never on the frontier
            run("whole-model", 5, 0.2, 0.2, cache="dropped")]  # another condition: not in the headline
    head = frontier.headline(runs)
    assert head["slo_s"] == 0.6  # whole-model meets 0.4, faasmoe 0.6 at best
    assert head["runs"] == {"always-on": "always-on", "whole-model": "whole-model K=15s", "faasmoe": "faasmoe K=300s"}
    assert head["vs_whole_model"] == pytest.approx(2.5 / 6.0)
    assert head["vs_always_on"] == pytest.approx(2.5 / 10.0)
    faas = [r["label"] for r in frontier.frontier([r for r in runs if r["setup"] == "faasmoe"])]
    assert faas == ["faasmoe K=300s", "faasmoe K=15s", "faasmoe K=1s"]
    table = {row["slo_s"]: row for row in frontier.slo_table(runs)}
    assert table[3.0]["whole-model"]["gib_s"] == 2.0 and table[3.0]["faasmoe"]["gib_s"] == 0.5
    assert table[0.4]["faasmoe"] is None


def test_every_run_meets_the_slo_row_of_its_own_p99():
    """A p99 of 0.6244 s is its own SLO row (shown as 0.624), not one it misses by the rounding."""
    runs = [run("whole-model", 300, 0.6244, 9.0), run("faasmoe", 15, 0.6091, 1.5)]
    rows = frontier.slo_table(runs)
    assert [row["whole-model"] is not None for row in rows] == [False, True]
    assert rows[1]["whole-model"]["gib_s"] == 9.0 and rows[1]["faasmoe"]["gib_s"] == 1.5


def test_repeats_pool_every_request_and_average_the_memory():
    from bench.payofflib.repeats import pool

    def measured(label: str, ttfts: list[float], gib: float, cache: str = "kept") -> dict:
        return {"label": label, "page_cache": cache, "ttft_samples_s": ttfts, "itl_samples_s": [0.02] * len(ttfts),
                "ttft_p99_s": max(ttfts), "requests": len(ttfts), "completed": len(ttfts), "failed": 0,
                "cold_percent": 10.0, "gib_s": {"weights_device": gib, "trunk": gib / 2}, "per_tenant": {"t": gib}}

    slow = [0.1] * 99 + [2.0]  # one slow request: its own run's p99 is 2.0
    fast = [0.1] * 100
    runs = [measured("whole-model K=1s", slow, 4.0), measured("faasmoe K=1s", fast, 1.0),
            measured("whole-model K=1s", fast, 6.0), measured("whole-model K=1s", fast, 5.0, cache="dropped")]
    pooled = pool(runs)
    assert [(r["label"], r["page_cache"]) for r in pooled] == [
        ("whole-model K=1s", "kept"), ("faasmoe K=1s", "kept"), ("whole-model K=1s", "dropped")]
    whole = pooled[0]
    assert whole["repeats"] == 2 and whole["ttft_p99_per_repeat_s"] == [2.0, 0.1]
    assert whole["ttft_p99_s"] < 2.0 and whole["requests"] == 200  # one slow request of 200 is past the p99
    assert whole["gib_s"] == {"weights_device": 5.0, "trunk": 2.5}
    assert "per_tenant" not in whole  # one run's detail is not shown as the pool's
    assert pooled[1] is runs[1]  # a single run stays as it was
