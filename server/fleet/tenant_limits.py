"""Tenant limits that hold across every ingress replica: one store, asked by all.

Owns two halves of one protocol:
- `LimitsStore`, the state: today's `Limiter` (token buckets, concurrency, the same refusals),
  living in one named Ray actor (`LIMITS_ACTOR`), so N ingress replicas give a tenant its tier's
  allowance once, not N times;
- `GlobalLimiter`, what each ingress uses in place of its own `Limiter` (the same interface, so
  submission.py does not change). The checks that decide (`peek`, `admit`) wait for the store's
  answer, bounded by `timeout_s`, in a worker thread of the API (`asks_elsewhere`); what only
  gives back (`release`, the `preparing` counts) is sent without waiting (Ray keeps one caller's
  calls to an actor in order).

A request counts against its tenant's concurrency while it is prepared (`preparing`, see
server/api/limits.py) and once admitted (in flight), never as both: in one process nothing runs
between admission and the end of preparing, but across processes another ingress's `peek`
would see both counts until the "stopped preparing" message arrived (a burst of exactly
`max_concurrent` requests was refused one, tests/fleet). So admitting moves the request's
choices out of preparing in the same store call, and the end of preparing gives back only what
admission did not take (the request's context remembers it).

An admission whose answer did not come in time is refused (or decided locally) here, but the
store may still run it later: it would hold a slot no request ever gives back. So every
admission carries a ticket, and a lost one is followed by `forget(ticket)`: the store refunds
what that admission charged, or, if it has not run it yet, refuses it when it comes.

When the store does not answer in time (its actor is gone, the network is cut), `on_loss` says
what happens: "closed" refuses with 429 (`limit` "limits_unavailable", Retry-After 1), "open"
falls back to this ingress's own `Limiter` (per-replica limits: bounded, but not global). Each
such decision is counted and `connected` turns false until the store answers again (/metrics).

Deliberately does not know: Ray's API (the transport is two callables, given by the ingress), HTTP,
or the engine.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from server.api.limits import Limiter, Refusal
from server.tenancy import Tenant

log = logging.getLogger("concentric.fleet")
LIMITS_ACTOR = "concentric-tenant-limits"
LOSS_MODES = ("closed", "open")
UNAVAILABLE = Refusal(
    "limits_unavailable",
    "the tenant limits store does not answer; retry shortly",
    1,
)
# The choices the current request still counts as preparing at the store (one per request: its
# handler's context), so that admitting it moves them to in flight at once.
_PREPARING: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "concentric_limits_preparing", default=None
)


# Tickets of admissions the store remembers, for a `forget` that follows a lost answer (it is
# sent right after the caller gave up, limits_timeout_s: far fewer admissions than this).
TICKETS_KEPT = 4096


class LimitsStore:
    """The global limit state (a Ray actor's class: every method is one round trip)."""

    def __init__(self) -> None:
        self.limiter = Limiter()
        self.admitted: OrderedDict[str, tuple[Tenant, int, int]] = OrderedDict()
        self.forgotten: OrderedDict[str, None] = OrderedDict()

    def admit(
        self,
        tenant: Tenant,
        tokens: int,
        requests: int,
        prepared: int = 0,
        ticket: str | None = None,
    ) -> Refusal | None:
        """Admit, and if admitted, `prepared` choices stop being prepared (one step: no one sees
        them counted twice). A forgotten ticket is refused (its caller is gone)."""
        if ticket is not None and ticket in self.forgotten:
            del self.forgotten[ticket]
            return UNAVAILABLE
        refusal = self.limiter.admit(tenant, tokens, requests)
        if refusal is None:
            if prepared:
                self.limiter.add_preparing(tenant, -prepared)
            if ticket is not None:
                _keep(self.admitted, ticket, (tenant, tokens, requests))
        return refusal

    def forget(self, ticket: str) -> None:
        """The caller of admission `ticket` gave up on its answer: undo it, or refuse it later."""
        charged = self.admitted.pop(ticket, None)
        if charged is None:
            _keep(self.forgotten, ticket, None)
        else:
            self.limiter.refund(*charged)

    def peek(self, tenant: Tenant, tokens: int, requests: int) -> Refusal | None:
        return self.limiter.peek(tenant, tokens, requests)

    def prepare(self, tenant: Tenant, requests: int) -> None:
        """`requests` choices start (positive) or stop (negative) being prepared."""
        self.limiter.add_preparing(tenant, requests)

    def release(self, tenant: Tenant, unused_tokens: int) -> None:
        self.limiter.release(tenant, unused_tokens)

    def in_flight(self, tenant: Tenant) -> int:
        return self.limiter.in_flight(tenant)

    def ping(self) -> bool:
        return True


def _keep(kept: OrderedDict, key: str, value) -> None:
    kept[key] = value
    while len(kept) > TICKETS_KEPT:
        kept.popitem(last=False)


# call(method, *args) -> the store's answer, or raises (TimeoutError, the actor is gone);
# send(method, *args) -> None, without waiting.
Call = Callable[..., Any]
Send = Callable[..., None]


class GlobalLimiter:
    """The `Limiter` interface over a `LimitsStore` somewhere else."""

    # Its decisions wait for another process: the API makes them off its event loop
    # (server/api/submission.py `decide`), so a slow or lost store stalls only the requests
    # being decided, not every stream of this ingress.
    asks_elsewhere = True

    def __init__(self, call: Call, send: Send, on_loss: str = "closed"):
        if on_loss not in LOSS_MODES:
            raise ValueError(f"limits_on_loss must be one of {', '.join(LOSS_MODES)}")
        self._call = call
        self._send = send
        self.on_loss = on_loss
        self.local = Limiter()  # "open": this replica's own limits while the store is away
        self.connected = True
        self.loss_decisions = 0  # admissions decided without the store
        self.refusals: dict[str, int] = {}
        self._lock = threading.Lock()
        # Tenants whose admissions were charged locally: their releases go to the local limiter.
        self._local_held: dict[str, int] = {}

    def wait_connected(self, timeout_s: float, clock=None) -> bool:
        """Ask the store until it answers (it may still be starting) or `timeout_s` passes."""
        import time

        clock = clock or time.monotonic
        deadline = clock() + timeout_s
        while True:
            try:
                self._call("ping")
                self.connected = True
                return True
            except Exception:
                if clock() >= deadline:
                    self.connected = False
                    return False

    def _ask(self, method: str, tenant: Tenant, *args) -> tuple[bool, Any]:
        try:
            answer = self._call(method, tenant, *args)
        except Exception as e:  # any failure to hear back is a lost contact
            if self.connected:
                log.warning(
                    "tenant limits store lost (%s: %s); failing %s",
                    type(e).__name__,
                    e,
                    self.on_loss,
                )
            self.connected = False
            return False, None
        if not self.connected:
            log.warning("tenant limits store answers again")
        self.connected = True
        return True, answer

    def _count(self, refusal: Refusal | None) -> Refusal | None:
        if refusal is not None:
            with self._lock:
                self.refusals[refusal.limit] = self.refusals.get(refusal.limit, 0) + 1
        return refusal

    def _lost(self, tenant: Tenant, tokens: int, requests: int, admit: bool) -> Refusal | None:
        with self._lock:
            self.loss_decisions += 1
        if self.on_loss == "closed":
            return self._count(UNAVAILABLE)
        if not admit:
            return self.local.peek(tenant, tokens, requests)
        refusal = self.local.admit(tenant, tokens, requests)
        if refusal is None:
            with self._lock:
                self._local_held[tenant.name] = self._local_held.get(tenant.name, 0) + requests
        return self._count(refusal)

    def admit(self, tenant: Tenant, tokens: int, requests: int = 1) -> Refusal | None:
        held = _PREPARING.get()
        prepared = min(held[0], requests) if held else 0
        ticket = uuid.uuid4().hex
        ok, answer = self._ask("admit", tenant, tokens, requests, prepared, ticket)
        if not ok:
            self._quietly("forget", ticket)  # the store may run the admission yet
            return self._lost(tenant, tokens, requests, admit=True)
        if answer is None and held:
            held[0] -= prepared  # the store moved them to in flight
        return self._count(answer)

    def peek(self, tenant: Tenant, tokens: int, requests: int = 1) -> Refusal | None:
        ok, answer = self._ask("peek", tenant, tokens, requests)
        if not ok:
            return self._lost(tenant, tokens, requests, admit=False)
        return self._count(answer)

    @contextlib.contextmanager
    def preparing(self, tenant: Tenant, requests: int = 1) -> Iterator[None]:
        self._quietly("prepare", tenant, requests)
        held = [requests]
        token = _PREPARING.set(held)
        try:
            yield
        finally:
            _PREPARING.reset(token)
            if held[0]:
                self._quietly("prepare", tenant, -held[0])

    def release(self, tenant: Tenant, unused_tokens: int = 0) -> None:
        with self._lock:
            local = self._local_held.get(tenant.name, 0)
            if local:
                self._local_held[tenant.name] = local - 1
        if local:
            self.local.release(tenant, unused_tokens)
        else:
            self._quietly("release", tenant, unused_tokens)

    def in_flight(self, tenant: Tenant) -> int:
        ok, answer = self._ask("in_flight", tenant)
        return int(answer) if ok else self.local.in_flight(tenant)

    def _quietly(self, method: str, *args) -> None:
        try:
            self._send(method, *args)
        except Exception as e:  # a give-back that cannot be sent is lost with the store
            log.debug("tenant limits %s not sent: %s", method, e)
