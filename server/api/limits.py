"""Per-tenant admission limits: concurrency, requests per minute, tokens per minute.

Owns the limit state. Rates are token buckets (capacity = the per-minute allowance, refilled
continuously), so a tenant may burst up to its minute's allowance and then proceeds at the rate.
A request is charged its prompt tokens plus its max output tokens when admitted; what it did not
generate is given back when it finishes. All checks pass or none is charged, and a refusal says
which limit and when to retry (`Retry-After`, whole seconds, at least 1).

Admission happens only after a request is fully validated (a refused request costs nothing), so
before the expensive part of validation (tokenizing) `peek` refuses what admission would refuse
anyway, and `preparing` counts the requests in that stage against the tenant's concurrency: one
tenant cannot queue more work in front of admission than it may run. What admission charged is a
`Reservation`, given back choice by choice, each exactly once.

Deliberately does not know: HTTP, tiers' files, or the engine.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from server.tenancy import Tenant


class TokenBucket:
    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0: now)."""
        self._refill(now)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass(frozen=True)
class Refusal:
    limit: str  # "concurrency" | "requests_per_minute" | "tokens_per_minute"
    message: str
    retry_after: int  # seconds
    never: bool = False  # the request exceeds the tier's whole allowance: retrying cannot help


class _TenantState:
    def __init__(self, tenant: Tenant, now: float):
        tier = tenant.tier
        self.in_flight = 0
        self.preparing = 0  # choices of requests between peek() and admission
        self.requests = TokenBucket(tier.requests_per_minute, now)
        self.tokens = TokenBucket(tier.tokens_per_minute, now)


class Limiter:
    asks_elsewhere = False  # decides in this process, at once (see fleet/tenant_limits.py)

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._states: dict[str, _TenantState] = {}
        self._lock = threading.Lock()
        self.refusals: dict[str, int] = {}  # limit -> count, for metrics

    def _state(self, tenant: Tenant, now: float) -> _TenantState:
        state = self._states.get(tenant.name)
        if state is None:
            state = self._states[tenant.name] = _TenantState(tenant, now)
        return state

    def admit(self, tenant: Tenant, tokens: int, requests: int = 1) -> Refusal | None:
        """Charge a request (or `requests` choices of one) or say which limit refuses it."""
        with self._lock:
            now = self.clock()
            s = self._state(tenant, now)
            refusal = self._refusal(tenant, s, now, tokens, requests, s.in_flight)
            if refusal is not None:
                self.refusals[refusal.limit] = self.refusals.get(refusal.limit, 0) + 1
                return refusal
            s.in_flight += requests
            s.requests.take(requests, now)
            s.tokens.take(tokens, now)
            return None

    def peek(self, tenant: Tenant, tokens: int, requests: int = 1) -> Refusal | None:
        """What admit() would say now, charging nothing, with the tenant's requests still being
        prepared counted as in flight. `tokens` is a lower bound of what it will reserve."""
        with self._lock:
            now = self.clock()
            s = self._state(tenant, now)
            refusal = self._refusal(tenant, s, now, tokens, requests, s.in_flight + s.preparing)
            if refusal is not None:
                self.refusals[refusal.limit] = self.refusals.get(refusal.limit, 0) + 1
            return refusal

    def add_preparing(self, tenant: Tenant, requests: int) -> None:
        """`requests` choices start (positive) or stop (negative) being prepared: `preparing`
        in two calls, for a store that serves several processes (server/fleet)."""
        with self._lock:
            s = self._state(tenant, self.clock())
            s.preparing = max(0, s.preparing + requests)

    @contextlib.contextmanager
    def preparing(self, tenant: Tenant, requests: int = 1) -> Iterator[None]:
        """Count `requests` choices as being prepared (see peek) while the block runs."""
        with self._lock:
            s = self._state(tenant, self.clock())
            s.preparing += requests
        try:
            yield
        finally:
            with self._lock:
                s.preparing -= requests

    @staticmethod
    def _refusal(
        tenant: Tenant, s: _TenantState, now: float, tokens: int, requests: int, in_flight: int
    ) -> Refusal | None:
        tier = tenant.tier
        too_big = [
            (
                requests > tier.max_concurrent,
                "concurrency",
                f"{requests} choices; tier {tier.name!r} allows {tier.max_concurrent} at once",
            ),
            (
                requests > tier.requests_per_minute,
                "requests_per_minute",
                f"{requests} choices; tier {tier.name!r} allows {tier.requests_per_minute} "
                "requests per minute",
            ),
            (
                tokens > tier.tokens_per_minute,
                "tokens_per_minute",
                f"this request reserves {tokens} tokens (prompt plus max output tokens, per "
                f"choice); tier {tier.name!r} allows {tier.tokens_per_minute} per minute",
            ),
        ]
        for exceeded, limit, message in too_big:
            if exceeded:
                return Refusal(limit, message, 0, never=True)
        if in_flight + requests > tier.max_concurrent:
            return Refusal(
                "concurrency",
                f"tenant {tenant.name!r} has {in_flight} request(s) in flight; tier "
                f"{tier.name!r} allows {tier.max_concurrent} at once",
                1,
            )
        if (wait := s.requests.wait_for(requests, now)) > 0:
            return Refusal(
                "requests_per_minute",
                f"tier {tier.name!r} allows {tier.requests_per_minute} requests per minute",
                math.ceil(wait),
            )
        if (wait := s.tokens.wait_for(tokens, now)) > 0:
            return Refusal(
                "tokens_per_minute",
                f"tier {tier.name!r} allows {tier.tokens_per_minute} tokens per minute "
                f"(this request reserves {tokens}: prompt plus max output tokens)",
                math.ceil(wait),
            )
        return None

    def release(self, tenant: Tenant, unused_tokens: int = 0) -> None:
        """A request finished: free its concurrency slot, give back tokens it did not use."""
        with self._lock:
            now = self.clock()
            s = self._state(tenant, now)
            s.in_flight = max(0, s.in_flight - 1)
            if unused_tokens > 0:
                s.tokens.give(unused_tokens, now)

    def refund(self, tenant: Tenant, tokens: int, requests: int = 1) -> None:
        """An admission that never took effect (its caller gave up waiting for the answer, in a
        store that serves several processes: server/fleet): everything it charged comes back."""
        with self._lock:
            now = self.clock()
            s = self._state(tenant, now)
            s.in_flight = max(0, s.in_flight - requests)
            s.requests.give(requests, now)
            s.tokens.give(tokens, now)

    def in_flight(self, tenant: Tenant) -> int:
        with self._lock:
            s = self._states.get(tenant.name)
            return 0 if s is None else s.in_flight


@dataclass
class Reservation:
    """What admission charged one API request: a concurrency slot and `tokens[i]` tokens (prompt
    plus max output tokens) for each choice i. Every choice is given back exactly once, by
    `release`: when its engine request finishes (the tokens it did not generate), or when it
    will never run (all of its tokens). Nothing else gives limits back."""

    limiter: Limiter
    tenant: Tenant
    tokens: list[int]  # per choice
    max_tokens: list[int]  # per choice
    _held: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._held = set(range(len(self.tokens)))

    @property
    def held(self) -> int:
        """Choices whose slot is still held."""
        return len(self._held)

    def release(self, choice: int, generated: int | None) -> None:
        """Give back choice `choice`: `generated` output tokens, or None if it never ran.
        Idempotent: a choice already given back is ignored."""
        if choice not in self._held:
            return
        self._held.discard(choice)
        if generated is None:
            unused = self.tokens[choice]
        else:
            unused = max(0, self.max_tokens[choice] - generated)
        self.limiter.release(self.tenant, unused)
