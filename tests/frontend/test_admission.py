"""Admission control with explicit clocks: token buckets, concurrency caps, refunds."""

from __future__ import annotations

import pytest

from faasmoe.tenancy.admission import Admission, ConcurrencyLimiter, RateLimiter, RequestTooLarge
from faasmoe.tenancy.tenants import Tenant


def test_bucket_starts_full_refills_continuously_and_tells_how_long_to_wait() -> None:
    t, rate = Tenant("acme", tokens_per_minute=600), RateLimiter()  # 10 tokens/s
    assert rate.check(t, 500, now=0.0) is None
    assert rate.check(t, 100, now=0.0) is None
    assert rate.check(t, 50, now=0.0) == pytest.approx(5.0)  # empty: 50 tokens take 5 s
    assert rate.available(t, now=0.0) == 0  # a rejected check charges nothing
    assert rate.check(t, 50, now=4.0) == pytest.approx(1.0)
    assert rate.check(t, 50, now=5.0) is None
    assert rate.available(t, now=1000.0) == 600  # never above capacity


def test_request_larger_than_the_whole_minute_is_rejected_not_delayed() -> None:
    t = Tenant("acme", tokens_per_minute=100)
    with pytest.raises(RequestTooLarge, match="needs 101 tokens"):
        RateLimiter().check(t, 101, now=0.0)
    d = Admission().admit(t, prompt_tokens=60, max_tokens=41, now=0.0)
    assert (d.ok, d.status, d.code, d.retry_after_s) == (False, 400, "request_too_large", None)
    assert "max_tokens" in d.message


def test_unlimited_tenants_are_never_limited() -> None:
    t, adm = Tenant("free"), Admission()
    decisions = [adm.admit(t, 10**6, 10**6, now=0.0) for _ in range(100)]
    assert all(d.ok and d.charged == 0 for d in decisions)
    for d in decisions:
        adm.settle(t, d.charged, used=10**6)
    assert adm.concurrency.in_flight(t) == 0


def test_concurrency_cap() -> None:
    t, cap = Tenant("acme", max_concurrent=2), ConcurrencyLimiter()
    assert cap.acquire(t) and cap.acquire(t) and not cap.acquire(t)
    cap.release(t)
    assert cap.acquire(t) and cap.in_flight(t) == 2
    assert cap.acquire(Tenant("other", max_concurrent=2))  # per tenant
    cap.release(t), cap.release(t), cap.release(t)  # an extra release is logged, not negative
    assert cap.in_flight(t) == 0 and cap.acquire(t) and cap.acquire(t) and not cap.acquire(t)


def test_admission_charges_up_front_and_settle_refunds_the_unused_part() -> None:
    t, adm = Tenant("acme", tokens_per_minute=1200, max_concurrent=4), Admission()  # 20 tokens/s
    first = adm.admit(t, prompt_tokens=100, max_tokens=900, now=0.0)
    assert first.ok and first.charged == 1000
    second = adm.admit(t, prompt_tokens=100, max_tokens=200, now=0.0)
    assert (second.ok, second.status, second.code) == (False, 429, "rate_limit_exceeded")
    assert second.retry_after_s == 5  # 300 needed, 200 left: 100 tokens at 20/s
    assert "1200 tokens per minute" in second.message
    adm.settle(t, first.charged, used=150, now=0.0)  # stopped early: 850 come back
    assert adm.rate.available(t, now=0.0) == pytest.approx(1050)
    assert adm.admit(t, prompt_tokens=100, max_tokens=200, now=0.0).ok
    assert adm.concurrency.in_flight(t) == 1  # the rejected request did not keep a slot


def test_retry_after_is_a_whole_second_at_least() -> None:
    t, adm = Tenant("acme", tokens_per_minute=6000), Admission()  # 100 tokens/s
    assert adm.admit(t, 5990, 0, now=0.0).ok
    d = adm.admit(t, 20, 0, now=0.0)  # 0.1 s short
    assert not d.ok and d.retry_after_s == 1


def test_concurrency_rejection_has_its_own_code_and_charges_nothing() -> None:
    t, adm = Tenant("acme", tokens_per_minute=600, max_concurrent=1), Admission()
    ok = adm.admit(t, 10, 10, now=0.0)
    busy = adm.admit(t, 10, 10, now=0.0)
    assert ok.ok and (busy.ok, busy.status, busy.code, busy.retry_after_s) == (False, 429,
                                                                               "concurrency_limit_exceeded", 1)
    assert adm.rate.available(t, now=0.0) == 580
    adm.settle(t, ok.charged, used=20)
    assert adm.admit(t, 10, 10, now=0.0).ok


def test_lowered_limit_applies_at_once() -> None:
    adm = Admission()
    assert adm.admit(Tenant("acme", tokens_per_minute=10000), 10, 10, now=0.0).ok
    lowered = Tenant("acme", tokens_per_minute=100)  # as re-read from the store on the next request
    assert adm.rate.available(lowered, now=0.0) == 100
    assert adm.admit(lowered, 50, 50, now=0.0).ok and not adm.admit(lowered, 1, 0, now=0.0).ok
