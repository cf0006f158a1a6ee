"""Prometheus metrics in the text exposition format 0.0.4, with no dependency.

Each process owns one `Registry` and renders it (the frontend at `GET /metrics`). Metric objects
are thread-safe: one lock per metric guards its labelled children and their values.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Iterator, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# 50 µs (a warm expert call on a GPU) .. 30 s (a cold load from disk, a long request).
LATENCY_BUCKETS: tuple[float, ...] = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def format_value(v: float) -> str:
    """A sample value as Prometheus writes it (`+Inf`, `-Inf`, `NaN`, otherwise a float)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels_text(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}" if pairs else ""


class _Metric:
    """A named family of time series, one child per combination of label values."""

    TYPE = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r} does not match [a-zA-Z_:][a-zA-Z0-9_:]*")
        for label in labels:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"label name {label!r} of {name} is not a valid Prometheus label")
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate label names in {name}: {list(labels)}")
        self.name, self.help, self.labelnames = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], _Child] = {}
        if not self.labelnames:
            self.labels()  # a label-less series exists (at zero) from the start

    def _key(self, values: dict[str, object]) -> tuple[str, ...]:
        if set(values) != set(self.labelnames):
            raise ValueError(f"{self.name} expects labels {list(self.labelnames)}, got {sorted(values)}")
        return tuple(str(values[n]) for n in self.labelnames)

    def labels(self, **values: object) -> _Child:
        """The child for these label values, created on first use."""
        key = self._key(values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def remove(self, **values: object) -> None:
        """Drop one child, e.g. the series of an evicted function."""
        key = self._key(values)
        with self._lock:
            self._children.pop(key, None)

    def _new_child(self) -> _Child:
        return _Child(self._lock)

    def same_as(self, other: _Metric) -> bool:
        return type(self) is type(other) and self.labelnames == other.labelnames

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.TYPE}"
        with self._lock:  # a consistent snapshot: no child changes while we read it
            for key, child in self._children.items():
                for suffix, extra, value in child.samples():
                    pairs = [*zip(self.labelnames, key), *extra]
                    yield f"{self.name}{suffix}{_labels_text(pairs)} {format_value(value)}"


class _Child:
    """One time series; its value is guarded by the metric's lock."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def samples(self) -> Iterator[tuple[str, tuple[tuple[str, str], ...], float]]:
        yield "", (), self.value


class _CounterChild(_Child):
    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up (inc by {amount})")
        super().inc(amount)


class _GaugeChild(_Child):
    def set(self, value: float) -> None:
        with self._lock:
            self.value = float(value)

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)


class _HistogramChild(_Child):
    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        super().__init__(lock)
        self._bounds = bounds
        self._counts = [0] * len(bounds)  # per bucket, not cumulative: observe is O(log n)
        self.count = 0

    def inc(self, amount: float = 1.0) -> None:
        raise TypeError("a histogram is observed, not incremented")

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self._bounds, value)  # first bucket with value <= le
        with self._lock:
            self._counts[min(i, len(self._counts) - 1)] += 1
            self.value += value
            self.count += 1

    def samples(self) -> Iterator[tuple[str, tuple[tuple[str, str], ...], float]]:
        cumulative = 0
        for le, n in zip(self._bounds, self._counts):
            cumulative += n
            yield "_bucket", (("le", format_value(le)),), cumulative
        yield "_sum", (), self.value
        yield "_count", (), self.count


class Counter(_Metric):
    """A value that only goes up; the name must end in `_total`."""

    TYPE = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)  # validates the name first
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")

    def _new_child(self) -> _CounterChild:
        return _CounterChild(self._lock)

    def inc(self, amount: float = 1.0) -> None:
        """Increment the label-less series."""
        self.labels().inc(amount)


class Gauge(_Metric):
    """A value that goes up and down (resident bytes, queue depth)."""

    TYPE = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild(self._lock)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)


class Histogram(_Metric):
    """Observations counted in cumulative buckets (`le`), with their sum and count."""

    TYPE = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or any(math.isnan(b) for b in bounds) or bounds != sorted(set(bounds)):
            raise ValueError(f"buckets of {name} must be non-empty, increasing and unique: {list(buckets)}")
        if "le" in labels:
            raise ValueError(f"histogram {name} cannot have a label named 'le'")
        self.buckets = tuple(bounds) if bounds[-1] == math.inf else (*bounds, math.inf)
        super().__init__(name, help, labels)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._lock, self.buckets)

    def same_as(self, other: _Metric) -> bool:
        return super().same_as(other) and self.buckets == getattr(other, "buckets", None)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


class Registry:
    """The metrics of one process; `render()` is the body of `GET /metrics`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def _register(self, metric: _Metric) -> _Metric:
        # Registering the same definition twice returns the first, so modules can declare
        # the metrics they use without coordinating; a conflicting definition is a bug.
        with self._lock:
            existing = self._metrics.get(metric.name)
            if existing is None:
                self._metrics[metric.name] = metric
                return metric
        if not existing.same_as(metric):
            raise ValueError(f"metric {metric.name} is already registered as a different {existing.TYPE}")
        return existing

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return self._register(Counter(name, help, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        return self._register(Gauge(name, help, labels))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._register(Histogram(name, help, labels, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        """Every metric in registration order, in the text format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(line + "\n" for m in metrics for line in m.render())


def merge_expositions(texts: list[str]) -> str:
    """Several processes' expositions as one: each family's HELP/TYPE once, then all its samples.

    Prometheus requires a family's samples to be contiguous; the scheduler serves its own
    metrics and every worker's (each labelled with its worker id) on one endpoint.
    """
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family not in headers:
                    headers[family] = []
                    families[family] = []
                if len(headers[family]) < 2 and line not in headers[family]:
                    headers[family].append(line)
            elif line and not line.startswith("#"):
                families.setdefault(family, []).append(line)
    return "".join(line + "\n" for name in families for line in (*headers.get(name, []), *families[name]))



_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)\Z")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def redact_exposition(text: str, aggregate: Sequence[str] = (), hidden: dict[str, set[str]] | None = None) -> str:
    """An exposition fit for an unauthenticated scraper: samples whose label `k` has a value in
    `hidden[k]` are dropped, and the `aggregate` labels are summed away (a histogram's buckets, sum
    and count stay consistent: every series here is a sum over requests). HELP/TYPE lines are kept."""
    hidden = hidden or {}
    lines: list[str | list] = []  # comment lines as they are; samples as [series, value]
    series: dict[str, list] = {}
    for line in text.splitlines():
        match = None if not line or line.startswith("#") else _SAMPLE.match(line)
        if match is None:
            lines.append(line)
            continue
        name, labels_text, value = match.groups()
        pairs = _PAIR.findall(labels_text or "")
        if any(_unescape_label(v) in hidden.get(k, ()) for k, v in pairs):
            continue
        kept = ",".join(f'{k}="{v}"' for k, v in pairs if k not in aggregate)
        head = f"{name}{{{kept}}}" if kept else name
        if head in series:
            series[head][1] += float(value)
        else:
            series[head] = [head, float(value)]
            lines.append(series[head])
    return "".join((line if isinstance(line, str) else f"{line[0]} {format_value(line[1])}") + "\n"
                   for line in lines)


def _unescape_label(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)
