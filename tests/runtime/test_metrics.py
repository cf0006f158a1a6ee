"""runtime.metrics: one prometheus_client registry per component, process metrics labelled with the
process's role, and merged or redacted expositions that prometheus_client's own parser reads back."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.metrics import LATENCY_BUCKETS, REQUEST_BUCKETS, TOKEN_BUCKETS, Registry, merge_expositions, redact_exposition


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value}, read by the reference parser (which fails on a malformed line)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def types(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def test_counter_gauge_histogram_render_and_parse() -> None:
    r = Registry()
    calls = r.counter("faasmoe_expert_invocations_total", "Expert function calls.", ("model_name", "function"))
    calls.labels(model_name="m", function="m/0/1").inc()
    calls.labels(model_name="m", function="m/0/1").inc(2)
    r.gauge("faasmoe_resident_expert_bytes", "Bytes of resident expert functions.").set(1024)
    ttft = r.histogram("faasmoe_time_to_first_token_seconds", "TTFT.", ("model_name",), buckets=(0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.5, 2.0, 20.0):
        ttft.labels(model_name="m").observe(v)
    text = r.render()
    assert "# TYPE faasmoe_expert_invocations_total counter\n" in text  # the name as the contract spells it
    assert "_created" not in text  # no per-series timestamps: they cannot be summed or merged
    got = samples(text)
    assert got[("faasmoe_expert_invocations_total", frozenset({("model_name", "m"), ("function", "m/0/1")}))] == 3
    assert got[("faasmoe_resident_expert_bytes", frozenset())] == 1024
    m = ("model_name", "m")
    assert [got[("faasmoe_time_to_first_token_seconds_bucket", frozenset({m, ("le", le)}))]
            for le in ("0.1", "1.0", "10.0", "+Inf")] == [2, 3, 4, 5]  # le is inclusive, buckets cumulative
    assert got[("faasmoe_time_to_first_token_seconds_sum", frozenset({m}))] == pytest.approx(22.65)
    assert types(text) == {"faasmoe_expert_invocations": "counter", "faasmoe_resident_expert_bytes": "gauge",
                           "faasmoe_time_to_first_token_seconds": "histogram"}


def test_counters_must_end_in_total_and_registries_are_separate() -> None:
    with pytest.raises(ValueError, match="_total"):
        Registry().counter("faasmoe_expert_invocations", "no suffix")
    a, b = Registry(), Registry()  # two components in one process (tests) do not collide
    a.counter("faasmoe_x_total", "x").inc()
    b.counter("faasmoe_x_total", "x")
    assert samples(a.render())[("faasmoe_x_total", frozenset())] == 1
    assert samples(b.render())[("faasmoe_x_total", frozenset())] == 0
    with pytest.raises(ValueError, match="Duplicated"):
        a.gauge("faasmoe_x_total", "again")


def test_buckets_are_increasing_and_span_their_ranges() -> None:
    for buckets in (LATENCY_BUCKETS, REQUEST_BUCKETS, TOKEN_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
    assert LATENCY_BUCKETS[0] <= 100e-6 and LATENCY_BUCKETS[-1] >= 30.0
    assert REQUEST_BUCKETS[-1] >= 1800.0 and TOKEN_BUCKETS[0] == 1 and TOKEN_BUCKETS[-1] >= 128 * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process collector reads /proc")
def test_process_metrics_carry_the_component_and_worker() -> None:
    worker = Registry("worker", "local-3")
    frontend = Registry("frontend")
    merged = merge_expositions([frontend.render(), worker.render()])
    got = samples(merged)
    rss = {labels: v for (name, labels), v in got.items() if name == "process_resident_memory_bytes"}
    assert set(rss) == {frozenset({("component", "frontend"), ("worker", "")}),
                        frozenset({("component", "worker"), ("worker", "local-3")})}
    assert all(v > 1e6 for v in rss.values())  # this test process's RSS, both times
    assert any(name == "process_cpu_seconds_total" for name, _ in got)
    assert types(merged)["process_cpu_seconds"] == "counter"
    assert not [name for name, _ in samples(Registry().render()) if name.startswith("process_")]


def test_merge_keeps_each_family_contiguous_with_one_header() -> None:
    a, b = Registry(), Registry()
    for r, worker in ((a, "w0"), (b, "w1")):
        r.counter("faasmoe_expert_invocations_total", "calls", ("worker",)).labels(worker=worker).inc()
        r.gauge("faasmoe_worker_queue_depth", "depth", ("worker",)).labels(worker=worker).set(2)
    merged = merge_expositions([a.render(), b.render()])
    assert merged.count("# TYPE faasmoe_expert_invocations_total counter") == 1
    lines = [line.split("{")[0] for line in merged.splitlines() if not line.startswith("#")]
    assert lines == ["faasmoe_expert_invocations_total"] * 2 + ["faasmoe_worker_queue_depth"] * 2
    assert len(samples(merged)) == 4


def test_redaction_drops_hidden_series_and_sums_tenants_away() -> None:
    r = Registry()
    tokens = r.counter("faasmoe_prompt_tokens_total", "tokens", ("model_name", "tenant"))
    ttft = r.histogram("faasmoe_time_to_first_token_seconds", "TTFT", ("model_name", "tenant"), buckets=(1.0,))
    for model, tenant, n in (("shared", "a", 3), ("shared", "b", 4), ("secret", "a", 5)):
        tokens.labels(model_name=model, tenant=tenant).inc(n)
        ttft.labels(model_name=model, tenant=tenant).observe(0.5)
    public = redact_exposition(r.render(), aggregate=("tenant",), hidden={"model_name": {"secret"}})
    assert "secret" not in public and "tenant" not in public
    got = samples(public)
    shared = frozenset({("model_name", "shared")})
    assert got[("faasmoe_prompt_tokens_total", shared)] == 7
    assert got[("faasmoe_time_to_first_token_seconds_count", shared)] == 2
    assert got[("faasmoe_time_to_first_token_seconds_bucket", shared | {("le", "+Inf")})] == 2
