"""Fair shares of one model among tenants: Virtual Token Counters (Sheng et al., OSDI'24).

Each tenant has a counter of the service it got, in weighted tokens divided by its weight: a prompt
token costs PROMPT_COST, a generated one OUTPUT_COST (a decode step's token reads as many weights as a
whole prefill chunk's). The engine serves the tenant with the lowest counter first: it admits waiting
requests in that order, and a tenant with nothing running whose counter is lowest gets its prefill
stepped at once, beside the running batch, which yields to it between ops (see ModelEngine). A tenant
that comes back from idle is lifted to the lowest counter of the busy ones, so idling banks no credit;
with one tenant busy, nothing changes: it has the whole pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PROMPT_COST = 1.0
OUTPUT_COST = 2.0  # VTC's default weights (w_p = 1, w_q = 2)


class FairShares:
    """Virtual token counters of one model's tenants."""

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}

    def arrive(self, tenant: str, busy: Iterable[str]) -> None:
        """`tenant` has a new request; `busy` are the tenants with requests waiting or running before it."""
        others = [self.counters.get(t, 0.0) for t in set(busy) if t != tenant]
        floor = min(others) if others else 0.0
        if tenant not in set(busy):  # back from idle: no credit for the time it asked for nothing
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        else:
            self.counters.setdefault(tenant, floor)

    def charge(self, tenant: str, weight: float, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = PROMPT_COST * prompt_tokens + OUTPUT_COST * output_tokens
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / max(weight, 1e-6)

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def next_index(self, tenants: Sequence[str]) -> int:
        """Of requests waiting in arrival order (their tenants), the one to admit next: the first of the
        tenant with the lowest counter."""
        best = min(range(len(tenants)), key=lambda i: (self.counter(tenants[i]), i))
        return best

    def most_underserved(self, tenant: str, running: Iterable[str]) -> bool:
        """Whether `tenant` has had no more service than any other tenant running now (ties go to it)."""
        others = [self.counter(t) for t in set(running) if t != tenant]
        return bool(others) and self.counter(tenant) <= min(others)

    def reset(self) -> None:
        """Forget every counter: the model is idle, nobody is owed anything (and the memory stays bounded)."""
        self.counters.clear()
