"""Elasticity: the resident FFN widths follow the accelerator's headroom, between steps.

Owns the residency decision and keeping requests whole across it. The subnet table defines
nested residency levels (vocabulary/residency_levels.py: level k serves the k smallest subnets
and every subnet that fits in the same widths). Between engine steps:

- headroom below the low-water mark: pick the next level down. Subnets that do not fit it stop
  being offered at once (new requests do not get them). Running requests on them are moved to the
  best subnet of the same KV layout class that fits and that their tier allows (their KV stays
  valid: no recompute) when one exists; the others are allowed to finish. When none is left on a
  removed width, the widths shrink and the memory is released.
- headroom above the high-water mark plus what growing one level needs at its peak (the new
  buffers of every changed layer are built whole while the old ones still serve steps): grow one
  level, built in the background; swapped in at a step boundary once ready. A grow that fails
  (the memory went elsewhere meanwhile) is abandoned, logged and counted, and growing backs off
  (doubling, up to a cap); no request ever sees it.
- an out-of-memory error in a step: shrink now, moving what can be moved and preempting the rest
  (they are recomputed later on a subnet that fits), then the step is retried.

Readings must know the allocator. PyTorch keeps freed blocks cached: until they are released a
shrink frees nothing the probe can see, so every resize, and every out-of-memory error, ends by
releasing cached blocks (`ResidentFfn.release_cached`). And a reading taken before a resize
settled describes memory that no longer exists: decisions use only readings the sampler started
after the last resize committed (its sequence number), so a level moves at most once per such
reading, however many steps run in between; the sampler is asked for a fresh one at once.

The gap between the two marks is the hysteresis: a shrink frees at least one level's bytes, which
must not be enough to trigger the next grow at once.

Moves respect the tier rule (`TierView.allows`): a request never lands on a subnet its tier
does not allow.

Deliberately does not know: how a subnet is chosen (policies/), how memory is measured
(telemetry/headroom.py), or tensors: it drives the runtime's weights through `ResidentFfn`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.engine.request import Request
from server.engine.scheduler import Scheduler
from server.telemetry.headroom import ProbeSampler
from server.vocabulary.residency_levels import residency_levels
from server.vocabulary.subnets import Subnet, SubnetTable

log = logging.getLogger("concentric.elasticity")


class PendingResize(Protocol):
    error: BaseException | None  # why a background build failed (set once done)

    def done(self) -> bool: ...


class ResizeReport(Protocol):
    uploaded_bytes: int
    released_bytes: int


class ResidentFfn(Protocol):
    """What elasticity needs of the runtime's weights (server/runtime/weights.py `Weights`)."""

    @property
    def full_widths(self) -> tuple[int, ...]: ...
    @property
    def resident_widths(self) -> tuple[int, ...]: ...
    @property
    def resident_bytes(self) -> int: ...
    def bytes_for(self, widths: Sequence[int]) -> int: ...
    def transient_bytes(self, widths: Sequence[int]) -> int:
        """Device bytes a resize from the resident widths to `widths` holds at its peak beyond
        the resident ones (new buffers built while the old still serve steps)."""

    def prepare_ffn(self, widths: Sequence[int], background: bool = True) -> PendingResize: ...
    def abandon_ffn(self, pending: PendingResize) -> None: ...
    def commit_ffn(self, pending: PendingResize) -> ResizeReport: ...
    def release_cached(self) -> None:
        """Give freed device memory back (the allocator caches it otherwise)."""


@dataclass(frozen=True)
class ElasticityConfig:
    low_water_bytes: int  # shrink when headroom falls below this
    high_water_bytes: int  # grow when headroom exceeds this plus the next level's peak need
    oom_cooldown_s: float = 30.0  # after an out-of-memory shrink, no growing for this long
    grow_backoff_s: float = 30.0  # after a failed grow, no growing for this long (doubling)
    max_grow_backoff_s: float = 600.0  # the doubling's cap


@dataclass
class ElasticityCounters:
    grows: int = 0
    shrinks: int = 0
    moves: int = 0  # running requests moved to a smaller KV-compatible subnet
    oom_shrinks: int = 0
    oom_preemptions: int = 0
    grow_failures: int = 0  # background grows abandoned because building them failed
    stale_readings: int = 0  # ticks that had only a reading from before the last resize


class Elasticity:
    def __init__(
        self,
        weights: ResidentFfn,
        table: SubnetTable,
        sampler: ProbeSampler | None,
        config: ElasticityConfig,
    ):
        self.weights = weights
        self.table = table
        self.sampler = sampler
        self.config = config
        self.levels = residency_levels(
            weights.full_widths, [(s.layers, s.widths, s.effective_params) for s in table]
        )
        self.level_bytes = [weights.bytes_for(level) for level in self.levels]
        widths = weights.resident_widths
        self.current = self.levels.index(widths) if widths in self.levels else len(self.levels) - 1
        self.target = self.current  # below current while a shrink waits for requests to leave
        self.counters = ElasticityCounters()
        self.moved: set[str] = set()  # ids of requests moved to another subnet (for tests/logs)
        self._growing: tuple[int, PendingResize] | None = None  # (level, resize) in flight
        # Readings numbered below this were started before the last resize settled (none yet).
        self._settled_seq = 0
        # An out-of-memory error says more than any reading (activations come and go between
        # readings), and a failed grow says the memory went elsewhere: no growing until then.
        self._no_grow_until = 0.0
        self._grow_backoff_s = config.grow_backoff_s

    # ---- what may run -----------------------------------------------------------------------

    def fits(self, subnet: Subnet, level: int | None = None) -> bool:
        widths = self.levels[self.target if level is None else level]
        return all(
            w <= widths[layer] for layer, w in zip(subnet.layers, subnet.widths, strict=True)
        )

    def offered(self, subnet: Subnet) -> bool:
        """Resident now and not about to be released."""
        return self.fits(subnet, self.current) and self.fits(subnet, self.target)

    @property
    def resident_widths(self) -> tuple[int, ...]:
        return self.weights.resident_widths

    @property
    def can_shrink(self) -> bool:
        return self.current > 0

    # ---- between steps ----------------------------------------------------------------------

    def tick(self, scheduler: Scheduler) -> None:
        if self._growing is not None:
            if not self._growing[1].done():
                return  # the ring is still uploading; steps go on at the current widths
            level, pending = self._growing
            self._growing = None
            self._finish_grow(level, pending)
            return
        snap = self._settled_reading()
        if snap is not None and self.target == self.current:
            free = snap.free_bytes
            if free < self.config.low_water_bytes and self.current > 0:
                self.target = self.current - 1
                log.warning(
                    "headroom %d B under the low-water mark: shrinking to level %d/%d",
                    free,
                    self.target,
                    len(self.levels) - 1,
                )
            elif self.current < len(self.levels) - 1 and time.monotonic() >= self._no_grow_until:
                up = self.current + 1
                peak = self.weights.transient_bytes(self.levels[up])
                if free > self.config.high_water_bytes + peak:
                    # Built in the background; swapped in at a later step boundary.
                    self._growing = (up, self.weights.prepare_ffn(self.levels[up]))
                    self.counters.grows += 1
                    log.info(
                        "headroom %d B (a grow holds %d B at its peak): growing to level %d/%d",
                        free,
                        peak,
                        up,
                        len(self.levels) - 1,
                    )
        if self.target < self.current:
            self._move_or_wait(scheduler, force=False)

    def on_out_of_memory(self, scheduler: Scheduler) -> bool:
        """Shrink now (one level). Returns False if already at the smallest level."""
        if self._growing is not None:  # abandon a growth in flight: it is what memory lacks
            self.weights.abandon_ffn(self._growing[1])
            self._growing = None
        # Whatever happens next, what the failed step cached goes back to the device, and no
        # reading from before it counts.
        self._no_grow_until = time.monotonic() + self.config.oom_cooldown_s
        if self.current == 0:
            self._settle()
            return False
        self.target = min(self.target, self.current - 1)
        self.counters.oom_shrinks += 1
        log.warning("out of memory in a step: shrinking to level %d now", self.target)
        self._move_or_wait(scheduler, force=True)  # forced: commits (and settles) at once
        return True

    def _settled_reading(self):
        """The newest reading if it began after the last resize settled; else None."""
        snap = self.sampler.latest if self.sampler else None
        if snap is None or snap.seq >= self._settled_seq:
            return snap
        self.counters.stale_readings += 1
        return None

    def _settle(self) -> None:
        """Memory changed: give cached blocks back, ignore older readings, ask for a new one."""
        self.weights.release_cached()
        if self.sampler is not None:
            self._settled_seq = self.sampler.next_seq
            self.sampler.request()

    def _finish_grow(self, level: int, pending: PendingResize) -> None:
        """Swap a finished background grow in, or, if building it failed, drop it: counted,
        logged and backed off, never a request's problem."""
        failure = pending.error
        if failure is None:
            try:
                self._commit(level, pending)
            except Exception as e:  # e.g. the widths moved meanwhile: same as a failed build
                failure = e
            else:
                self._grow_backoff_s = self.config.grow_backoff_s
                return
        self.weights.abandon_ffn(pending)
        self.counters.grow_failures += 1
        self._no_grow_until = time.monotonic() + self._grow_backoff_s
        log.warning(
            "growing to level %d failed (%s: %s); staying at level %d, no growing for %.0f s",
            level,
            type(failure).__name__,
            failure,
            self.current,
            self._grow_backoff_s,
        )
        self._grow_backoff_s = min(2 * self._grow_backoff_s, self.config.max_grow_backoff_s)
        self._settle()

    def _move_or_wait(self, scheduler: Scheduler, force: bool) -> None:
        blocking = []
        for req in list(scheduler.running):
            if req.subnet is None or self.fits(req.subnet):
                continue
            smaller = self._kv_compatible(req)
            if smaller is not None and (not req.pinned or force):
                log.info(
                    "moving %s from %s to %s (same KV layout)",
                    req.request_id,
                    req.subnet.name,
                    smaller.name,
                )
                req.subnet = smaller
                self.counters.moves += 1
                self.moved.add(req.request_id)
            elif force:
                scheduler.preempt(req)  # recomputed later, on a subnet that fits
                if not req.pinned:
                    req.subnet = None  # chosen again at re-admission
                self.counters.oom_preemptions += 1
            else:
                blocking.append(req.request_id)
        if not blocking:
            self._apply(self.target)
            self.counters.shrinks += 1

    def _kv_compatible(self, req: Request) -> Subnet | None:
        assert req.subnet is not None
        candidates = [
            s
            for s in self.table
            if s.kv_key == req.subnet.kv_key
            and self.fits(s)
            and (req.tier is None or req.tier.allows(s.name, self.table.scores[s.name]))
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda s: (self.table.scores[s.name], s.effective_params))

    def _apply(self, level: int) -> None:
        self._commit(level, self.weights.prepare_ffn(self.levels[level], background=False))

    def _commit(self, level: int, pending) -> None:
        report = self.weights.commit_ffn(pending)
        self.current = self.target = level
        self._settle()
        log.info(
            "resident FFN widths now level %d (%d B resident; +%d B uploaded, -%d B released)",
            level,
            self.weights.resident_bytes,
            report.uploaded_bytes,
            report.released_bytes,
        )
