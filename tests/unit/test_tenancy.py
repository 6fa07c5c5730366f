"""server/tenancy.py and server/api/limits.py: tenants, tiers, keys and admission limits (plain
Python, no torch).

Proves: keys are stored and compared only as SHA-256 hashes (given directly or read from an
environment variable), and authentication finds the right tenant and nobody else; every
configuration error is refused with a message naming the culprit (unknown tier, unknown subnet in
a tier, duplicate keys, malformed hashes, unknown settings, bad values); and, with a fake clock,
that the token buckets refill continuously up to one minute's allowance, admission is
all-or-nothing, release frees the slot and gives back unused tokens, and Retry-After is the wait
rounded up to whole seconds, at least 1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.api.limits import Limiter, Reservation, TokenBucket
from server.tenancy import (
    OPEN_TIER,
    Tenancy,
    TenancyError,
    Tenant,
    Tier,
    hash_key,
    load_tenancy,
    load_tiers,
    open_tenancy,
)

SUBNETS = ("full", "e2b", "e2.98b-layer")
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _files(
    tmp_path: Path, tenants: dict[str, Any], tiers: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    if tiers is None:
        tiers = {"gold": {"subnets": ["*"]}, "tin": {"subnets": ["e2b"]}}
    tenants_path, tiers_path = tmp_path / "tenants.yaml", tmp_path / "tiers.yaml"
    tenants_path.write_text(yaml.safe_dump({"tenants": tenants}))
    tiers_path.write_text(yaml.safe_dump({"tiers": tiers}))
    return tenants_path, tiers_path


def _load(tmp_path: Path, tenants: dict[str, Any], tiers=None, env=None) -> Tenancy:
    return load_tenancy(*_files(tmp_path, tenants, tiers), SUBNETS, env=env or {})


# ---- keys and authentication ---------------------------------------------------------------


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("abc") == ABC_SHA256
    assert hash_key("sk-1") == hashlib.sha256(b"sk-1").hexdigest()


def test_authenticate_by_hash_and_env(tmp_path: Path) -> None:
    tenancy = _load(
        tmp_path,
        {
            "acme": {"tier": "gold", "keys": [{"sha256": ABC_SHA256.upper()}, {"env": "ACME_KEY"}]},
            "bolt": {"tier": "tin", "keys": [{"env": "BOLT_KEY"}]},
            "nokey": {"tier": "tin", "keys": [{"env": "UNSET_KEY"}]},  # not set: no key at all
        },
        env={"ACME_KEY": "sk-acme-2", "BOLT_KEY": "sk-bolt"},
    )
    acme, bolt, nokey = tenancy.tenants
    assert tenancy.authenticate("abc") is acme  # upper-case hex accepted
    assert tenancy.authenticate("sk-acme-2") is acme
    assert tenancy.authenticate("sk-bolt") is bolt
    assert bolt.tier.name == "tin" and bolt.tier.subnets == ("e2b",)
    assert nokey.key_hashes == ()
    for wrong in (None, "", "sk-bolt ", "ABC", ABC_SHA256):  # a hash is not a key
        assert tenancy.authenticate(wrong) is None
    # Keys are never held in clear.
    assert "sk-acme-2" not in repr(tenancy) and acme.key_hashes == (
        ABC_SHA256,
        hash_key("sk-acme-2"),
    )


def test_empty_key_never_matches_even_if_listed(tmp_path: Path) -> None:
    tenancy = _load(tmp_path, {"acme": {"tier": "gold", "keys": [{"sha256": hash_key("")}]}})
    assert tenancy.authenticate("") is None and tenancy.authenticate(None) is None


def test_open_tenancy() -> None:
    tenancy = open_tenancy()
    assert tenancy.open and tenancy.authenticate(None) is tenancy.tenants[0]
    assert tenancy.authenticate("anything").tier is OPEN_TIER


def test_the_tier_view_carries_the_tier_rule() -> None:
    assert Tier("any").view().allows("e2b", 50.9)
    tin = Tier("tin", subnets=("e2b",), quality_ceiling=55.0)
    assert tin.view().allows("e2b", 50.9) and not tin.view().allows("full", 62.3)


# ---- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenants", "fragment"),
    [
        ({"acme": {"tier": "platinum", "keys": []}}, "tenant 'acme': unknown tier 'platinum'"),
        ({"acme": {"keys": []}}, "unknown tier None"),
        (
            {
                "acme": {"tier": "gold", "keys": [{"env": "K1"}]},
                "bolt": {"tier": "tin", "keys": [{"sha256": hash_key("shared")}]},
            },
            "tenant 'bolt': a key is also tenant 'acme''s",
        ),
        ({"acme": {"tier": "gold", "keys": [{"sha256": "abc"}]}}, "sha256 must be 64 hex digits"),
        ({"acme": {"tier": "gold", "keys": [{"sha256": "z" * 64}]}}, "64 hex digits"),
        ({"acme": {"tier": "gold", "keys": [{"sha256": 12}]}}, "64 hex digits"),
        ({"acme": {"tier": "gold", "keys": ["sk-in-clear"]}}, "each key is {sha256:"),
        ({"acme": {"tier": "gold", "keys": [{"plain": "x"}]}}, "each key is {sha256:"),
        (
            {"acme": {"tier": "gold", "keys": [{"env": "K1", "sha256": ABC_SHA256}]}},
            "each key is {sha256:",
        ),
        ({"acme": {"tier": "gold", "quota": 5}}, "unknown setting(s): quota"),
        ({"acme": "gold"}, "expected 'tier' and 'keys'"),
        ({"bad name!": {"tier": "gold"}}, "invalid tenant name"),
        ({}, "no tenants defined"),
    ],
)
def test_tenant_errors(tmp_path: Path, tenants: dict[str, Any], fragment: str) -> None:
    with pytest.raises(TenancyError) as info:
        _load(tmp_path, tenants, env={"K1": "shared"})
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("tiers", "fragment"),
    [
        ({"gold": {"subnets": ["e2b", "e7b"]}}, "tier 'gold' names unknown subnet(s): e7b"),
        ({"gold": {"subnets": "e2b"}}, "subnets must be a list"),
        ({"gold": {"burst": 3}}, "tier 'gold': unknown setting(s): burst"),
        ({"gold": {"max_concurrent": 0}}, "max_concurrent must be an integer >= 1, got 0"),
        ({"gold": {"requests_per_minute": 1.5}}, "requests_per_minute must be an integer"),
        ({"gold": {"tokens_per_minute": True}}, "tokens_per_minute must be an integer"),
        ({"gold": {"priority": "high"}}, "priority must be an integer"),
        ({"gold": {"target_ttft_s": -1}}, "target_ttft_s must be a non-negative number"),
        ({"gold": {"quality_floor": 60, "quality_ceiling": 50}}, "quality_floor is above"),
        ({"gold": ["e2b"]}, "expected a mapping of settings"),
        ({"bad name!": {}}, "invalid tier name"),
        ({}, "no tiers defined"),
    ],
)
def test_tier_errors(tmp_path: Path, tiers: dict[str, Any], fragment: str) -> None:
    with pytest.raises(TenancyError) as info:
        _load(tmp_path, {"acme": {"tier": "gold"}}, tiers=tiers)
    assert fragment in str(info.value)


def test_file_shape_errors(tmp_path: Path) -> None:
    _, tiers_path = _files(tmp_path, {"acme": {"tier": "gold"}})
    with pytest.raises(TenancyError, match="does not exist"):
        load_tenancy(tmp_path / "missing.yaml", tiers_path, SUBNETS, env={})
    tiers_path.write_text("tiers: [1]\n")
    with pytest.raises(TenancyError, match="expected one top-level mapping 'tiers:'"):
        load_tiers(tiers_path)
    tiers_path.write_text("tiers: {gold: {}}\nextra: 1\n")
    with pytest.raises(TenancyError, match="expected one top-level mapping"):
        load_tiers(tiers_path)
    tiers_path.write_text("tiers: {gold: [\n")
    with pytest.raises(TenancyError, match="not valid YAML"):
        load_tiers(tiers_path)


def test_tier_values_and_defaults(tmp_path: Path) -> None:
    tiers = {
        "gold": {"priority": 1, "requests_per_minute": 7, "quality_floor": 50, "subnets": ["*"]},
        "plain": {},
    }
    tenancy = _load(tmp_path, {"acme": {"tier": "gold"}, "bolt": {"tier": "plain"}}, tiers=tiers)
    gold, plain = tenancy.tiers["gold"], tenancy.tiers["plain"]
    assert (gold.priority, gold.requests_per_minute, gold.quality_floor) == (1, 7, 50)
    assert plain == Tier("plain")  # every default
    assert tenancy.tenants[0].tier is gold


def test_repository_files_load() -> None:
    from server.config import REPO

    configs = REPO / "configs"
    tiers = load_tiers(configs / "tiers.yaml")
    subnets = {s for tier in tiers.values() for s in tier.subnets if s != "*"}
    tenancy = load_tenancy(
        configs / "tenants.yaml", configs / "tiers.yaml", subnets | {"full"}, env={}
    )
    assert {t.tier.name for t in tenancy.tenants} <= set(tiers)


# ---- limits --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _tenant(name: str = "acme", **limits: Any) -> Tenant:
    return Tenant(name, Tier(f"{name}-tier", **limits))


def test_token_bucket_refills_continuously_up_to_capacity() -> None:
    bucket = TokenBucket(60, now=0.0)  # 1 per second, 60 at most
    assert bucket.wait_for(60, 0.0) == 0
    bucket.take(60, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, 0.5) == pytest.approx(0.5)
    assert bucket.wait_for(10, 4.0) == pytest.approx(6.0)
    assert bucket.wait_for(60, 1000.0) == 0 and bucket.level == 60  # capped at one minute's
    bucket.give(30, 1000.0)
    assert bucket.level == 60


def test_requests_per_minute_and_retry_after() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    acme = _tenant(requests_per_minute=2)
    assert limiter.admit(acme, 10) is None
    assert limiter.admit(acme, 10) is None
    refusal = limiter.admit(acme, 10)
    assert refusal is not None and refusal.limit == "requests_per_minute"
    assert refusal.retry_after == 30  # one request at 2/60 per second
    assert "allows 2 requests per minute" in refusal.message
    clock.advance(29.5)
    assert limiter.admit(acme, 10).retry_after == 1  # 0.5 s rounds up to 1
    clock.advance(0.5)
    assert limiter.admit(acme, 10) is None  # the next allowed request
    assert limiter.refusals == {"requests_per_minute": 2}


def test_retry_after_rounds_up_and_is_at_least_one() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    acme = _tenant(tokens_per_minute=600)  # 10 tokens per second
    assert limiter.admit(acme, 599) is None
    refusal = limiter.admit(acme, 2)  # 1 short: 0.1 s
    assert refusal.limit == "tokens_per_minute" and refusal.retry_after == 1
    assert "reserves 2" in refusal.message and "allows 600 tokens per minute" in refusal.message
    refusal = limiter.admit(acme, 22)  # 21 short: 2.1 s
    assert refusal.retry_after == 3
    clock.advance(2.1)
    assert limiter.admit(acme, 22) is None


def test_admission_is_all_or_nothing() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    acme = _tenant(requests_per_minute=5, tokens_per_minute=100, max_concurrent=3)
    # A token refusal charges neither a request nor a concurrency slot.
    refusal = limiter.admit(acme, 101)
    assert refusal.limit == "tokens_per_minute"
    assert limiter.in_flight(acme) == 0
    state = limiter._states["acme"]
    assert state.requests.level == 5 and state.tokens.level == 100
    # A concurrency refusal charges nothing either.
    assert limiter.admit(acme, 10, requests=3) is None  # n=3: three slots, three requests
    assert limiter.in_flight(acme) == 3
    assert limiter.admit(acme, 10).limit == "concurrency"
    assert state.requests.level == 2 and state.tokens.level == 90
    # A request refusal charges no tokens.
    limiter.release(acme)
    limiter.release(acme)
    limiter.release(acme)
    assert limiter.admit(acme, 10, requests=3).limit == "requests_per_minute"
    assert state.tokens.level == 90 and limiter.in_flight(acme) == 0


def test_release_frees_the_slot_and_gives_back_unused_tokens() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    acme = _tenant(tokens_per_minute=100, max_concurrent=1)
    assert limiter.admit(acme, 80) is None  # prompt + max_tokens reserved
    assert limiter.admit(acme, 1).limit == "concurrency"
    limiter.release(acme, unused_tokens=50)  # it generated 50 fewer than it reserved
    assert limiter.in_flight(acme) == 0
    assert limiter._states["acme"].tokens.level == pytest.approx(70)
    assert limiter.admit(acme, 70) is None  # exactly what is back
    limiter.release(acme, unused_tokens=1000)  # never above one minute's allowance
    assert limiter._states["acme"].tokens.level == 100
    limiter.release(acme)  # an extra release never goes below zero in flight
    assert limiter.in_flight(acme) == 0


def test_tenants_are_limited_separately() -> None:
    limiter = Limiter(FakeClock())
    acme, bolt = _tenant("acme", requests_per_minute=1), _tenant("bolt", requests_per_minute=1)
    assert limiter.admit(acme, 1) is None
    assert limiter.admit(acme, 1) is not None
    assert limiter.admit(bolt, 1) is None
    assert limiter.in_flight(bolt) == 1 and limiter.in_flight(_tenant("new")) == 0


def test_peek_charges_nothing_and_counts_requests_being_prepared() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    acme = _tenant(requests_per_minute=5, tokens_per_minute=100, max_concurrent=3)
    state = limiter._state(acme, clock())
    assert limiter.peek(acme, 10, requests=2) is None
    assert state.requests.level == 5 and state.tokens.level == 100 and state.in_flight == 0
    with limiter.preparing(acme, 2):
        refusal = limiter.peek(acme, 10, requests=2)  # 2 being prepared + 2 > 3
        assert refusal is not None and refusal.limit == "concurrency"
        assert limiter.admit(acme, 10, requests=2) is None  # admission counts only admitted
    assert state.preparing == 0 and limiter.peek(acme, 10, requests=1) is None
    assert limiter.peek(acme, 101).never  # more than a minute's tokens: never admissible
    assert limiter.refusals == {"concurrency": 1, "tokens_per_minute": 1}


def test_preparing_is_undone_when_the_block_fails() -> None:
    limiter = Limiter(FakeClock())
    acme = _tenant(max_concurrent=1)
    with pytest.raises(RuntimeError), limiter.preparing(acme):
        raise RuntimeError("tokenizer failed")
    assert limiter.peek(acme, 2) is None


def test_reservation_gives_each_choice_back_exactly_once() -> None:
    clock = FakeClock()
    limiter = Limiter(clock)
    acme = _tenant(tokens_per_minute=100, max_concurrent=3)
    assert limiter.admit(acme, 60, requests=3) is None
    res = Reservation(limiter, acme, tokens=[20, 20, 20], max_tokens=[15, 15, 15])
    state = limiter._states["acme"]
    assert res.held == 3 and state.in_flight == 3 and state.tokens.level == 40
    res.release(0, generated=5)  # ran: 10 of its 15 output tokens back
    res.release(0, generated=0)  # again: ignored
    assert state.in_flight == 2 and state.tokens.level == pytest.approx(50)
    res.release(2, None)  # never ran: all 20 back
    assert state.in_flight == 1 and state.tokens.level == pytest.approx(70)
    res.release(1, generated=99)  # generated more than reserved: nothing back, slot freed
    assert res.held == 0 and state.in_flight == 0 and state.tokens.level == pytest.approx(70)
