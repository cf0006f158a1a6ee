"""Per-tenant request schedules: what every setup of one benchmark replays, request for request.

Each tenant alternates ON and OFF periods (exponential lengths; its profile sets the means), and
sends requests as a Poisson process while ON, so some tenants sit idle for long stretches, which
is where scale to zero pays. Prompt and output lengths are log-normal, clipped. A tenant's prompts
draw their token ids from its own subset of the vocabulary (disjoint across tenants): with a
token-routed model (`faasmoe model init --router-skew`) that is per-tenant task locality, since a
narrow task touches fewer experts than all tenants together. Everything is a function of the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TenantProfile:
    """How busy a tenant is: mean ON and OFF period lengths, as fractions of the schedule."""

    kind: str
    on_fraction: float
    off_fraction: float

    @property
    def duty(self) -> float:
        return self.on_fraction / (self.on_fraction + self.off_fraction)


# Cycled over the tenants: one busy, one bursty, one mostly idle, and so on.
PROFILES = (
    TenantProfile("steady", on_fraction=0.30, off_fraction=0.08),
    TenantProfile("bursty", on_fraction=0.12, off_fraction=0.25),
    TenantProfile("sparse", on_fraction=0.06, off_fraction=0.50),
)


@dataclass(frozen=True)
class LengthDistribution:
    """Log-normal with this median and sigma (of the log), rounded and clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return int(min(self.high, max(self.low, round(rng.lognormvariate(math.log(self.median), self.sigma)))))

    def describe(self) -> str:
        return f"LogNormal(median {self.median:g}, sigma {self.sigma:g}) clipped to [{self.low}, {self.high}]"


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything a schedule is a function of."""

    tenants: int = 6
    duration_s: float = 120.0
    rate_on: float = 0.25  # requests per second per tenant while ON
    prompt: LengthDistribution = field(default_factory=lambda: LengthDistribution(48, 0.5, 8, 160))
    output: LengthDistribution = field(default_factory=lambda: LengthDistribution(16, 0.4, 4, 40))
    subset_size: int = 24  # distinct prompt token ids per tenant
    vocab_size: int = 151936
    avoid_ids: tuple[int, ...] = ()  # special tokens
    seed: int = 0

    def tenant_names(self) -> list[str]:
        return [f"tenant-{i}" for i in range(self.tenants)]

    def profile(self, index: int) -> TenantProfile:
        return PROFILES[index % len(PROFILES)]

    def describe(self) -> str:
        kinds = ", ".join(f"{p.kind} (mean ON {p.on_fraction * self.duration_s:.3g}s / OFF "
                          f"{p.off_fraction * self.duration_s:.3g}s)" for p in PROFILES[:self.tenants])
        return (f"{self.tenants} tenants over {self.duration_s:g}s, seed {self.seed}; profiles cycled: {kinds}; "
                f"Poisson arrivals at {self.rate_on:g}/s while ON; prompt tokens {self.prompt.describe()}, "
                f"output tokens {self.output.describe()} (EOS ignored, greedy); each tenant's prompts draw "
                f"from its own {self.subset_size} token ids (disjoint)")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Request:
    """One request of the schedule: who sends it, when (seconds from the start), and what."""

    tenant: str
    index: int  # within the tenant
    at: float
    prompt: tuple[int, ...]
    max_tokens: int

    @property
    def key(self) -> str:
        return f"{self.tenant}#{self.index}"


def token_subsets(spec: WorkloadSpec) -> dict[str, list[int]]:
    """Disjoint token-id subsets, one per tenant (the special tokens excluded)."""
    rng = random.Random(f"subsets:{spec.seed}")
    avoid = set(spec.avoid_ids)
    pool = [i for i in range(spec.vocab_size) if i not in avoid]
    need = spec.tenants * spec.subset_size
    if need > len(pool):
        raise ValueError(f"{spec.tenants} tenants x {spec.subset_size} tokens exceed the vocabulary ({len(pool)})")
    chosen = rng.sample(pool, need)
    return {name: sorted(chosen[i * spec.subset_size:(i + 1) * spec.subset_size])
            for i, name in enumerate(spec.tenant_names())}


def on_periods(profile: TenantProfile, duration_s: float, rng: random.Random) -> list[tuple[float, float]]:
    """The ON intervals of one tenant within [0, duration_s)."""
    mean_on, mean_off = profile.on_fraction * duration_s, profile.off_fraction * duration_s
    on = rng.random() < profile.duty
    t, periods = 0.0, []
    while t < duration_s:
        length = rng.expovariate(1.0 / (mean_on if on else mean_off))
        if on:
            periods.append((t, min(duration_s, t + length)))
        t += length
        on = not on
    return periods


def build_schedule(spec: WorkloadSpec) -> list[Request]:
    """Every request of every tenant, in send order. Each tenant sends at least one request."""
    subsets = token_subsets(spec)
    requests: list[Request] = []
    for i, name in enumerate(spec.tenant_names()):
        rng = random.Random(f"tenant:{spec.seed}:{i}")
        times = []
        for start, end in on_periods(spec.profile(i), spec.duration_s, rng):
            t = start + rng.expovariate(spec.rate_on)
            while t < end:
                times.append(t)
                t += rng.expovariate(spec.rate_on)
        if not times:  # a tenant that never woke up still exists; give it one request
            times.append(rng.uniform(0, spec.duration_s * 0.9))
        for n, at in enumerate(sorted(times)):
            prompt = tuple(rng.choice(subsets[name]) for _ in range(spec.prompt.sample(rng)))
            requests.append(Request(name, n, round(at, 4), prompt, spec.output.sample(rng)))
    return sorted(requests, key=lambda r: (r.at, r.tenant))


def schedule_summary(requests: list[Request]) -> dict[str, dict]:
    """Requests, prompt and output tokens per tenant: the work every setup must complete."""
    out: dict[str, dict] = {}
    for r in requests:
        s = out.setdefault(r.tenant, {"requests": 0, "prompt_tokens": 0, "output_tokens": 0})
        s["requests"] += 1
        s["prompt_tokens"] += len(r.prompt)
        s["output_tokens"] += r.max_tokens
    return out
