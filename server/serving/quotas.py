"""Per-tenant quotas, per replica: token buckets for requests and tokens per minute, and a count
of requests in flight.

A request reserves its worst case at admission (its prompt, plus max_new_tokens for each of its n
samples) and gives back what it did not use when it ends, so a tenant is charged exactly for the
tokens it got, and can never run more at once than its budget allows. Each bucket holds one
minute's worth and refills continuously. The clock is injected, so tests step time instead of
sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidRequest, RateLimited
from .tenants import Limits, Tenant

CONCURRENT_RETRY_S = 1.0  # what a caller over its concurrent limit is told to wait: no clock says when one ends


class TokenBucket:
    """Up to `per_minute` tokens, refilled at per_minute / 60 a second."""

    def __init__(self, per_minute: float, now: float):
        self.per_minute, self.level, self.updated = per_minute, per_minute, now

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + max(0.0, now - self.updated) * self.per_minute / 60)
        self.updated = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        self.refill(now)
        return max(0.0, amount - self.level) * 60 / self.per_minute

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level = min(self.per_minute, self.level + amount)


@dataclass
class _TenantState:
    limits: Limits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0


@dataclass
class Reservation:
    """One admitted request's hold on its tenant's quotas; settle() once, when it ends."""

    quotas: "Quotas | None"
    tenant: str
    tokens: int
    settled: bool = field(default=False, repr=False)

    def settle(self, used_tokens: int) -> None:
        """Give back the tokens reserved and not used, and the request's place in flight."""
        if not self.settled and self.quotas is not None:
            self.settled = True
            self.quotas._settle(self.tenant, self.tokens, used_tokens)


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, _TenantState] = {}

    def reserve(self, tenant: Tenant, tokens: int) -> Reservation:
        """Admit one request of `tenant` that may use `tokens` (prompt + completions), or raise
        RateLimited (which limit, and when to retry). A request that could never fit the tenant's
        tokens_per_minute is an InvalidRequest: waiting would not help."""
        limits = tenant.limits
        if limits.tokens_per_minute is not None and tokens > limits.tokens_per_minute:
            raise InvalidRequest(f"this request may use {tokens} tokens (its prompt, and max_tokens for each sample), "
                                 f"more than tenant {tenant.name!r} may use in a minute ({limits.tokens_per_minute:g}): "
                                 "lower max_tokens")
        with self._lock:
            now = self._clock()
            state = self._state_of(tenant, now)
            if limits.concurrent is not None and state.in_flight >= limits.concurrent:
                raise RateLimited(f"tenant {tenant.name!r} has {state.in_flight} requests running, its limit "
                                  f"(concurrent: {limits.concurrent})", "concurrent", CONCURRENT_RETRY_S)
            for limit, bucket, amount in (("requests_per_minute", state.requests, 1),
                                          ("tokens_per_minute", state.tokens, tokens)):
                wait = bucket.wait_s(amount, now) if bucket is not None else 0.0
                if wait > 0:
                    raise RateLimited(f"tenant {tenant.name!r} is over its {limit} ({bucket.per_minute:g}); retry in "
                                      f"{math.ceil(wait)} s", limit, wait)
            for bucket, amount in ((state.requests, 1), (state.tokens, tokens)):
                if bucket is not None:
                    bucket.take(amount)
            state.in_flight += 1
        return Reservation(self, tenant.name, tokens)

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            state = self._state.get(tenant)
            return state.in_flight if state else 0

    def _state_of(self, tenant: Tenant, now: float) -> _TenantState:  # holds the lock
        """The tenant's buckets, following its limits when the tenants file changed them (a
        bucket keeps its level, cut to its new size)."""
        state = self._state.get(tenant.name)
        if state is None or state.limits != tenant.limits:
            requests = _resized(state and state.requests, tenant.limits.requests_per_minute, now)
            tokens = _resized(state and state.tokens, tenant.limits.tokens_per_minute, now)
            state = self._state[tenant.name] = _TenantState(tenant.limits, requests, tokens,
                                                            state.in_flight if state else 0)
        return state

    def _settle(self, tenant: str, reserved: int, used: int) -> None:
        with self._lock:
            state = self._state[tenant]
            state.in_flight -= 1
            if state.tokens is not None:
                if used <= reserved:
                    state.tokens.give(reserved - used, self._clock())
                else:  # more than reserved cannot happen (max_new_tokens bounds it); charged all the same
                    state.tokens.take(used - reserved)


def _resized(bucket: TokenBucket | None, per_minute: float | None, now: float) -> TokenBucket | None:
    if per_minute is None:
        return None
    if bucket is None:
        return TokenBucket(per_minute, now)
    bucket.refill(now)
    bucket.per_minute, bucket.level = per_minute, min(bucket.level, per_minute)
    return bucket
