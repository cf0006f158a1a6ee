"""Prometheus text exposition: the output parses line by line and means what it says."""

from __future__ import annotations

import math
import re
import threading

import pytest

from runtime.metrics import LATENCY_BUCKETS, Registry, format_value

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf'({_NAME})(\{{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\}})? (\S+)\Z')
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def _unescape(v: str) -> str:
    return re.sub(r"\\([\\\"n])", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def parse(text: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, dict[str, str], float]]]:
    """A strict reader of format 0.0.4: {name: (type, help)} and [(name, labels, value)]."""
    assert text.endswith("\n")
    families: dict[str, list[str]] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if m := re.fullmatch(rf"# HELP ({_NAME}) (.*)", line):
            families.setdefault(m[1], ["", ""])[1] = m[2]
        elif m := re.fullmatch(rf"# TYPE ({_NAME}) (counter|gauge|histogram)", line):
            families.setdefault(m[1], ["", ""])[0] = m[2]
        else:
            m = _SAMPLE.fullmatch(line)
            assert m, f"unparsable line {line!r}"
            labels = {k: _unescape(v) for k, v in _PAIR.findall(m[2] or "")}
            samples.append((m[1], labels, float(m[3])))
    return {k: (v[0], v[1]) for k, v in families.items()}, samples


def test_counter_gauge_render_and_parse() -> None:
    r = Registry()
    calls = r.counter("faasmoe_expert_invocations_total", "Expert function calls.", ("model", "function"))
    calls.labels(model="m", function="m/0/1").inc()
    calls.labels(model="m", function="m/0/1").inc(2)
    calls.labels(model="m", function="m/3/0").inc()
    resident = r.gauge("faasmoe_resident_expert_bytes", "Bytes of resident expert functions.")
    resident.set(1024)
    resident.inc(10)
    resident.dec(4)
    families, samples = parse(r.render())
    assert families == {
        "faasmoe_expert_invocations_total": ("counter", "Expert function calls."),
        "faasmoe_resident_expert_bytes": ("gauge", "Bytes of resident expert functions."),
    }
    assert ("faasmoe_expert_invocations_total", {"model": "m", "function": "m/0/1"}, 3.0) in samples
    assert ("faasmoe_expert_invocations_total", {"model": "m", "function": "m/3/0"}, 1.0) in samples
    assert ("faasmoe_resident_expert_bytes", {}, 1030.0) in samples


def test_label_less_series_exist_at_zero_and_labelled_ones_on_first_use() -> None:
    r = Registry()
    r.counter("a_total", "a")
    r.counter("b_total", "b", ("tenant",))
    _, samples = parse(r.render())
    assert samples == [("a_total", {}, 0.0)]


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    r = Registry()
    h = r.histogram("faasmoe_time_to_first_token_seconds", "TTFT.", ("model",), buckets=(0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.5, 2.0, 20.0):
        h.labels(model="m").observe(v)
    families, samples = parse(r.render())
    assert families["faasmoe_time_to_first_token_seconds"][0] == "histogram"
    buckets = [(s[1]["le"], s[2]) for s in samples if s[0].endswith("_bucket")]
    assert buckets == [("0.1", 2.0), ("1.0", 3.0), ("10.0", 4.0), ("+Inf", 5.0)]  # le is inclusive
    assert all(s[1]["model"] == "m" for s in samples)
    values = {s[0]: s[2] for s in samples}
    assert values["faasmoe_time_to_first_token_seconds_sum"] == pytest.approx(22.65)
    assert values["faasmoe_time_to_first_token_seconds_count"] == 5.0
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == values["faasmoe_time_to_first_token_seconds_count"]


def test_default_latency_buckets_span_microseconds_to_seconds() -> None:
    assert LATENCY_BUCKETS[0] <= 100e-6 and LATENCY_BUCKETS[-1] >= 30.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    h = Registry().histogram("lat_seconds", "latency")
    h.observe(75e-6)
    _, samples = parse("".join(line + "\n" for line in h.render()))
    first = next(s for s in samples if s[0] == "lat_seconds_bucket" and s[2] == 1.0)
    assert float(first[1]["le"]) == 100e-6


def test_label_values_escaped() -> None:
    r = Registry()
    c = r.counter("x_total", 'help with \\ and\nnewline', ("v",))
    nasty = 'a\\b"c\nd'
    c.labels(v=nasty).inc()
    text = r.render()
    assert 'x_total{v="a\\\\b\\"c\\nd"} 1.0\n' in text
    assert "# HELP x_total help with \\\\ and\\nnewline\n" in text
    families, samples = parse(text)
    assert samples == [("x_total", {"v": nasty}, 1.0)]
    assert families["x_total"][1] == "help with \\\\ and\\nnewline"  # escaped on the wire


def test_names_and_labels_validated() -> None:
    r = Registry()
    with pytest.raises(ValueError, match="_total"):
        r.counter("faasmoe_expert_invocations", "no suffix")
    for bad in ("1abc_total", "a-b_total", "a b_total", ""):
        with pytest.raises(ValueError, match="metric name"):
            r.counter(bad, "bad")
    with pytest.raises(ValueError, match="label"):
        r.gauge("g", "g", ("bad-label",))
    with pytest.raises(ValueError, match="le"):
        r.histogram("h", "h", ("le",))
    with pytest.raises(ValueError, match="increasing"):
        r.histogram("h", "h", buckets=(1.0, 0.5))
    g = r.gauge("g", "g", ("a",))
    with pytest.raises(ValueError, match="expects labels"):
        g.labels(b="1")
    with pytest.raises(ValueError, match="expects labels"):
        g.set(1)  # a labelled metric has no label-less series
    with pytest.raises(ValueError, match="only goes up"):
        r.counter("c_total", "c").inc(-1)


def test_registering_twice_returns_the_same_metric_or_fails_on_conflict() -> None:
    r = Registry()
    a = r.counter("c_total", "c", ("x",))
    assert r.counter("c_total", "c", ("x",)) is a
    with pytest.raises(ValueError, match="already registered"):
        r.gauge("c_total", "c", ("x",))
    with pytest.raises(ValueError, match="already registered"):
        r.counter("c_total", "c", ("y",))


def test_remove_drops_a_series() -> None:
    r = Registry()
    g = r.gauge("resident_bytes", "r", ("function",))
    g.labels(function="m/0/0").set(5)
    g.labels(function="m/0/1").set(7)
    g.remove(function="m/0/0")
    _, samples = parse(r.render())
    assert samples == [("resident_bytes", {"function": "m/0/1"}, 7.0)]


def test_concurrent_increments_sum_exactly() -> None:
    r = Registry()
    c = r.counter("hits_total", "h", ("worker",))
    h = r.histogram("lat_seconds", "l", buckets=(0.5,))
    n_threads, n = 8, 5000

    def work(i: int) -> None:
        for j in range(n):
            c.labels(worker=str(j % 3)).inc()
            h.observe(0.25 if j % 2 else 1.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, samples = parse(r.render())
    assert sum(v for name, _, v in samples if name == "hits_total") == n_threads * n
    values = {(name, labels.get("le")): v for name, labels, v in samples}
    assert values[("lat_seconds_count", None)] == n_threads * n
    assert values[("lat_seconds_bucket", "0.5")] == n_threads * n / 2
    assert values[("lat_seconds_sum", None)] == pytest.approx(n_threads * n * 0.625)


def test_format_value_special_floats() -> None:
    assert [format_value(v) for v in (math.inf, -math.inf, math.nan, 3, 5e-05)] == [
        "+Inf", "-Inf", "NaN", "3.0", "5e-05",
    ]
