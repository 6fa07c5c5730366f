"""Tenants and their tiers: who a request belongs to, and what that tenant may do.

Owns `configs/tenants.yaml` and `configs/tiers.yaml`: parsing, validation (unknown keys are errors,
every tenant's tier exists, every pinnable subnet exists), and resolving an API key to its tenant.
Key files never hold a key in clear: each key is the hex SHA-256 of the key, or the name of an
environment variable holding one (for local use). Lookup hashes the presented key and compares it
with every known hash in constant time, without stopping at a match.

Plain Python: the policies read tiers' targets from here too.
Deliberately does not know: HTTP, request bodies, or rate-limit state (limits.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from policies.snapshots import TierView

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9._-]+")


class TenancyError(ValueError):
    pass


@dataclass(frozen=True)
class Tier:
    name: str
    priority: int = 0  # lower is served first
    subnets: tuple[str, ...] = ("*",)  # subnets it may use (pinned or chosen); "*" = any
    max_concurrent: int = 16  # requests in flight at once per tenant
    requests_per_minute: int = 600
    tokens_per_minute: int = 1_000_000  # prompt + max output tokens, charged at admission
    max_prompt_tokens: int = 32768
    max_output_tokens: int = 4096
    # Service targets and quality bounds, used by the subnet-choice policy.
    target_ttft_s: float | None = None  # p95 time to first token
    target_tpot_s: float | None = None  # p95 time per output token
    quality_floor: float | None = None  # smallest quality score (SubnetTable.scores) accepted
    quality_ceiling: float | None = None  # largest it is given

    def view(self) -> TierView:
        """What the subnet policy sees of this tier."""
        return TierView(
            self.name,
            self.priority,
            self.subnets,
            self.target_ttft_s,
            self.target_tpot_s,
            self.quality_floor,
            self.quality_ceiling,
        )


@dataclass(frozen=True)
class Tenant:
    name: str
    tier: Tier
    key_hashes: tuple[str, ...] = field(repr=False, default=())


@dataclass(frozen=True)
class Tenancy:
    tenants: tuple[Tenant, ...]
    tiers: Mapping[str, Tier]
    open: bool = False  # development mode: every request is the default tenant's

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant whose key this is, or None. Constant time in the key's content."""
        if self.open:
            return self.tenants[0]
        digest = hashlib.sha256((key or "").encode()).hexdigest()
        found = None
        for tenant in self.tenants:
            for h in tenant.key_hashes:
                if hmac.compare_digest(digest, h) and key:
                    found = tenant  # keep going: the time taken does not reveal which matched
        return found


OPEN_TIER = Tier(
    "open",
    priority=0,
    subnets=("*",),
    max_concurrent=1024,
    requests_per_minute=1_000_000,
    tokens_per_minute=1_000_000_000,
)


def open_tenancy() -> Tenancy:
    return Tenancy((Tenant("default", OPEN_TIER),), {"open": OPEN_TIER}, open=True)


_TIER_KEYS = {f for f in Tier.__dataclass_fields__ if f != "name"}


def load_tiers(path: Path) -> dict[str, Tier]:
    data = _read(path, "tiers")
    tiers = {}
    for name, spec in data.items():
        where = f"{path}: tier {name!r}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TenancyError(f"{path}: invalid tier name {name!r}")
        if not isinstance(spec, dict):
            raise TenancyError(f"{where}: expected a mapping of settings")
        unknown = sorted(set(spec) - _TIER_KEYS)
        if unknown:
            raise TenancyError(f"{where}: unknown setting(s): {', '.join(unknown)}")
        values = dict(spec)
        if "subnets" in values:
            subnets = values["subnets"]
            if not isinstance(subnets, list) or not all(isinstance(s, str) for s in subnets):
                raise TenancyError(f"{where}: subnets must be a list of subnet names")
            values["subnets"] = tuple(subnets)
        for key in (
            "priority",
            "max_concurrent",
            "requests_per_minute",
            "tokens_per_minute",
            "max_prompt_tokens",
            "max_output_tokens",
        ):
            if key in values:
                v = values[key]
                if key == "priority":  # any integer: lower is served first
                    if not isinstance(v, int) or isinstance(v, bool):
                        raise TenancyError(f"{where}: priority must be an integer, got {v!r}")
                elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise TenancyError(f"{where}: {key} must be an integer >= 1, got {v!r}")
        for key in ("target_ttft_s", "target_tpot_s", "quality_floor", "quality_ceiling"):
            v = values.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                raise TenancyError(f"{where}: {key} must be a non-negative number, got {v!r}")
        floor, ceiling = values.get("quality_floor"), values.get("quality_ceiling")
        if floor is not None and ceiling is not None and floor > ceiling:
            raise TenancyError(f"{where}: quality_floor is above quality_ceiling")
        tiers[name] = Tier(name=name, **values)
    if not tiers:
        raise TenancyError(f"{path}: no tiers defined")
    return tiers


def load_tenancy(
    tenants_path: Path,
    tiers_path: Path,
    subnet_names: Iterable[str],
    env: Mapping[str, str] | None = None,
) -> Tenancy:
    env = os.environ if env is None else env
    tiers = load_tiers(Path(tiers_path))
    known = set(subnet_names)
    for tier in tiers.values():
        bad = [s for s in tier.subnets if s != "*" and s not in known]
        if bad:
            raise TenancyError(
                f"{tiers_path}: tier {tier.name!r} names unknown subnet(s): {', '.join(bad)}"
            )
    data = _read(Path(tenants_path), "tenants")
    tenants: list[Tenant] = []
    seen_keys: dict[str, str] = {}
    for name, spec in data.items():
        where = f"{tenants_path}: tenant {name!r}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TenancyError(f"{tenants_path}: invalid tenant name {name!r}")
        if not isinstance(spec, dict) or set(spec) - {"tier", "keys"}:
            extra = sorted(set(spec) - {"tier", "keys"}) if isinstance(spec, dict) else []
            raise TenancyError(
                f"{where}: expected 'tier' and 'keys'"
                + (f"; unknown setting(s): {', '.join(extra)}" if extra else "")
            )
        tier = tiers.get(spec.get("tier"))
        if tier is None:
            raise TenancyError(f"{where}: unknown tier {spec.get('tier')!r}")
        hashes = []
        for entry in spec.get("keys") or []:
            hashes.extend(_key_hashes(entry, where, env))
        for h in hashes:
            if h in seen_keys:
                raise TenancyError(f"{where}: a key is also tenant {seen_keys[h]!r}'s")
            seen_keys[h] = name
        tenants.append(Tenant(name, tier, tuple(hashes)))
    if not tenants:
        raise TenancyError(f"{tenants_path}: no tenants defined")
    return Tenancy(tuple(tenants), tiers)


def _key_hashes(entry: Any, where: str, env: Mapping[str, str]) -> list[str]:
    if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in ("sha256", "env"):
        raise TenancyError(f"{where}: each key is {{sha256: <64 hex digits>}} or {{env: VARIABLE}}")
    kind, value = next(iter(entry.items()))
    if kind == "sha256":
        if not isinstance(value, str) or not _HEX64.fullmatch(value.lower()):
            raise TenancyError(f"{where}: sha256 must be 64 hex digits (the key's SHA-256)")
        return [value.lower()]
    key = env.get(str(value))
    if not key:
        return []  # a local key that is not set: that tenant simply has no key from it
    return [hashlib.sha256(key.encode()).hexdigest()]


def _read(path: Path, top: str) -> dict:
    if not path.is_file():
        raise TenancyError(f"{path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TenancyError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or set(data) != {top} or not isinstance(data[top], dict):
        raise TenancyError(f"{path}: expected one top-level mapping '{top}:'")
    return data[top]


def hash_key(key: str) -> str:
    """What goes into tenants.yaml for a key: `concentric hash-key` prints it."""
    return hashlib.sha256(key.encode()).hexdigest()
