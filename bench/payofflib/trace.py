"""A seeded multi-tenant trace: who sends what, when.

Each tenant sends Gamma-distributed inter-arrivals (shape 1/CV², scale CV²/rate: CV 1 is Poisson, CV 4 is
bursts separated by long idle gaps) at its own rate, 0.01-1 requests/s spread geometrically over the
tenants. Its prompts are real text of its domain (held-out documents of the corpus the model was trained
on, tokenized by the model's tokenizer), cut to a length drawn as the Azure LLM inference traces have them:
code (long prompts, short outputs) for the source-code domains, conversation (medium both) for the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.paperlib.workload import LengthDistribution, Request

CODE_DOMAINS = ("python", "c")
# (prompt tokens, output tokens), log-normal and clipped, per kind of traffic
LENGTHS = {
    "code": (LengthDistribution(384, 0.6, 64, 1536), LengthDistribution(24, 0.5, 4, 96)),
    "conversation": (LengthDistribution(160, 0.6, 32, 768), LengthDistribution(48, 0.5, 8, 160)),
}


@dataclass(frozen=True)
class TenantTraffic:
    """One tenant's model, domain and arrival process."""

    name: str
    model: str  # the served model name it sends to
    domain: str
    rate: float  # requests per second, long-run mean
    cv: float  # coefficient of variation of its inter-arrival times

    @property
    def kind(self) -> str:
        return "code" if self.domain in CODE_DOMAINS else "conversation"


def geometric_rates(tenants: int, high: float = 1.0, low: float = 0.01) -> list[float]:
    """`tenants` rates from `high` down to `low`, evenly spaced on a log scale."""
    if tenants == 1:
        return [high]
    return [high * (low / high) ** (i / (tenants - 1)) for i in range(tenants)]


def arrivals(rate: float, cv: float, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival times in [0, duration_s) of a renewal process with Gamma inter-arrivals of mean 1/rate."""
    shape = 1.0 / cv**2
    scale = cv**2 / rate
    times, t = [], rng.uniform(0, 1.0 / rate)  # a random phase: tenants do not all start at 0
    while t < duration_s:
        times.append(t)
        t += rng.gammavariate(shape, scale)
    return times


def build_trace(tenants: list[TenantTraffic], streams: dict[str, list[int]], duration_s: float,
                seed: int = 0) -> list[Request]:
    """Every request of every tenant in send order; `streams` holds each domain's held-out token ids.
    A tenant whose process drew no arrival in the window still sends one (it exists, it is just rare)."""
    requests = []
    for i, tenant in enumerate(tenants):
        rng = random.Random(f"payoff:{seed}:{i}")
        times = arrivals(tenant.rate, tenant.cv, duration_s, rng) or [rng.uniform(0, duration_s * 0.9)]
        prompt_len, output_len = LENGTHS[tenant.kind]
        stream = streams[tenant.domain]
        for n, at in enumerate(times):
            length = min(prompt_len.sample(rng), len(stream) - 1)
            start = rng.randrange(len(stream) - length)
            requests.append(Request(tenant.name, n, round(at, 4), tuple(stream[start:start + length]),
                                    output_len.sample(rng)))
    return sorted(requests, key=lambda r: (r.at, r.tenant))


def describe(tenants: list[TenantTraffic], duration_s: float) -> str:
    rows = ", ".join(f"{t.name} ({t.model}, {t.domain}, {t.rate:.3g}/s, CV {t.cv:g})" for t in tenants)
    kinds = "; ".join(f"{k}: prompt {p.describe()}, output {o.describe()}" for k, (p, o) in LENGTHS.items())
    return f"{len(tenants)} tenants over {duration_s:g}s, Gamma inter-arrivals: {rows}. Lengths (tokens) {kinds}"
