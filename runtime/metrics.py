"""Prometheus metrics through prometheus_client: the project's buckets, one registry per component,
process metrics labelled with the process's role, and the merge and redaction of expositions.

Each component (frontend, scheduler, worker) owns a `Registry` of its own, never prometheus_client's
global default, so that tests running several components in one process keep them apart. The
frontend serves its own exposition merged with the scheduler's and every worker's at `GET /metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# `*_created` series (a timestamp per counter and histogram child) double the exposition, and summing
# them (redaction) or mixing them across processes (merging) means nothing; vLLM dashboards don't read them.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
# 50 µs (a warm expert call on a GPU) .. 30 s (a cold load from disk, a long gap between tokens).
LATENCY_BUCKETS: tuple[float, ...] = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)
# A whole request or one of its phases (queue, prefill, decode): ms on a GPU .. half an hour on a CPU.
REQUEST_BUCKETS: tuple[float, ...] = (
    1e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0,
)
# Tokens per request, 1-2-5 steps as vLLM's (which stop at the model's context length).
TOKEN_BUCKETS: tuple[float, ...] = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5)) + (1e6,)


class ProcessMetrics(Collector):
    """prometheus_client's process collector (RSS, CPU seconds, open fds, start time), its series
    labelled `component` (frontend | scheduler | worker) and `worker` (the worker's id, "" elsewhere),
    so that one merged exposition tells the processes of a cluster apart."""

    def __init__(self, component: str, worker: str = "") -> None:
        self._inner = ProcessCollector(registry=None)  # reads /proc/self at each scrape: this process
        self._labels = {"component": component, "worker": worker}

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            family.samples = [s._replace(labels={**self._labels, **s.labels}) for s in family.samples]
            yield family


class Registry(CollectorRegistry):
    """The metrics of one component; `render()` is its exposition. With a `component`, the process's
    own metrics (`ProcessMetrics`) are part of it: give it to one registry per process only."""

    def __init__(self, component: str | None = None, worker: str = "") -> None:
        super().__init__()
        if component is not None:
            self.register(ProcessMetrics(component, worker))

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        if not name.endswith("_total"):  # the public contract; prometheus_client would add it silently
            raise ValueError(f"counter name {name!r} must end in _total")
        return Counter(name, help, labels, registry=self)

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, help, labels, registry=self)

    def histogram(self, name: str, help: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, help, labels, registry=self, buckets=buckets)

    def render(self) -> str:
        """Every metric in the text format 0.0.4."""
        return generate_latest(self).decode()


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
    return "".join((line if isinstance(line, str) else f"{line[0]} {floatToGoString(line[1])}") + "\n"
                   for line in lines)


def _unescape_label(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)
