"""Per-tenant admission control in memory: a token bucket for tokens per minute and a concurrency cap.

Called from the frontend's event loop only (no locks). Limits are read from the `Tenant` passed
on every call, so a limit changed in the store applies from the tenant's next request.
Tokens are charged up front (prompt + max_tokens, the most a request can use, as Ray Serve's and
Envoy's token buckets do) and the unused part is refunded by `settle` when the request finishes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from faasmoe.tenancy.tenants import Tenant

log = logging.getLogger(__name__)


class RequestTooLarge(ValueError):
    """A request needs more tokens than the tenant's whole per-minute budget: waiting cannot help."""


@dataclass
class _Bucket:
    level: float
    updated: float


class RateLimiter:
    """Tokens-per-minute token buckets, one per tenant: capacity = the limit, refilled continuously."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def check(self, tenant: Tenant, tokens: int, now: float | None = None) -> float | None:
        """Charge `tokens` and return None, or return the seconds until they would fit (nothing charged).
        Raises RequestTooLarge when `tokens` exceeds the bucket's capacity."""
        capacity = tenant.tokens_per_minute
        if capacity <= 0:
            return None
        if tokens > capacity:
            raise RequestTooLarge(f"this request needs {tokens} tokens but tenant {tenant.name!r} may use "
                                  f"{capacity} tokens per minute; lower max_tokens or shorten the prompt")
        now = time.monotonic() if now is None else now
        bucket = self._refill(tenant, now)
        if bucket.level >= tokens:
            bucket.level -= tokens
            return None
        return (tokens - bucket.level) * 60.0 / capacity

    def refund(self, tenant: Tenant, tokens: int, now: float | None = None) -> None:
        """Give back tokens charged but not used (never above capacity)."""
        if tenant.tokens_per_minute <= 0 or tokens <= 0:
            return
        bucket = self._refill(tenant, time.monotonic() if now is None else now)
        bucket.level = min(float(tenant.tokens_per_minute), bucket.level + tokens)

    def available(self, tenant: Tenant, now: float | None = None) -> float:
        """Tokens the tenant could use right now (inf when unlimited)."""
        if tenant.tokens_per_minute <= 0:
            return math.inf
        return self._refill(tenant, time.monotonic() if now is None else now).level

    def _refill(self, tenant: Tenant, now: float) -> _Bucket:
        capacity = float(tenant.tokens_per_minute)
        bucket = self._buckets.get(tenant.name)
        if bucket is None:
            bucket = self._buckets[tenant.name] = _Bucket(capacity, now)  # a new tenant starts with a full minute
        elapsed = max(0.0, now - bucket.updated)  # a clock that steps back must not drain the bucket
        # min() also clamps a bucket whose limit was just lowered.
        bucket.level = min(capacity, bucket.level + elapsed * capacity / 60.0)
        bucket.updated = max(bucket.updated, now)
        return bucket


class ConcurrencyLimiter:
    """In-flight requests per tenant against max_concurrent (0 = unlimited)."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}

    def acquire(self, tenant: Tenant) -> bool:
        count = self._in_flight.get(tenant.name, 0)
        if 0 < tenant.max_concurrent <= count:
            return False
        self._in_flight[tenant.name] = count + 1
        return True

    def release(self, tenant: Tenant) -> None:
        count = self._in_flight.get(tenant.name, 0)
        if count <= 0:
            log.warning("release of tenant %s without a matching acquire", tenant.name)
            return
        if count == 1:
            del self._in_flight[tenant.name]
        else:
            self._in_flight[tenant.name] = count - 1

    def in_flight(self, tenant: Tenant) -> int:
        return self._in_flight.get(tenant.name, 0)


@dataclass
class Decision:
    """Admission's answer: ok, or an HTTP status, OpenAI-style error code, message and Retry-After."""

    ok: bool
    status: int = 200
    message: str = ""
    code: str = ""
    retry_after_s: int | None = None  # None when retrying cannot help (request too large)
    charged: int = 0  # tokens charged up front; pass to Admission.settle


class Admission:
    """Concurrency cap then token bucket; every admitted request must be `settle`d exactly once."""

    def __init__(self) -> None:
        self.rate = RateLimiter()
        self.concurrency = ConcurrencyLimiter()

    def admit(self, tenant: Tenant, prompt_tokens: int, max_tokens: int, now: float | None = None) -> Decision:
        if not self.concurrency.acquire(tenant):
            return Decision(False, 429, f"tenant {tenant.name!r} already has {tenant.max_concurrent} requests in "
                            "flight (its max_concurrent); retry when one finishes",
                            "concurrency_limit_exceeded", retry_after_s=1)
        charge = prompt_tokens + max_tokens
        try:
            wait = self.rate.check(tenant, charge, now)
        except RequestTooLarge as exc:
            self.concurrency.release(tenant)
            # A 400, not a 429: clients (the openai SDK among them) retry 429s, and waiting cannot help.
            return Decision(False, 400, str(exc), "request_too_large", retry_after_s=None)
        if wait is not None:
            self.concurrency.release(tenant)
            return Decision(False, 429, f"tenant {tenant.name!r} is over its {tenant.tokens_per_minute} tokens per "
                            f"minute (this request reserves {charge}: prompt {prompt_tokens} + max_tokens "
                            f"{max_tokens}); retry in {wait:.1f}s", "rate_limit_exceeded",
                            retry_after_s=max(1, math.ceil(wait)))
        return Decision(True, charged=charge if tenant.tokens_per_minute > 0 else 0)

    def settle(self, tenant: Tenant, charged: int, used: int, now: float | None = None) -> None:
        """The request finished having used `used` tokens: refund the rest and free its concurrency slot."""
        self.rate.refund(tenant, charged - used, now)
        self.concurrency.release(tenant)
