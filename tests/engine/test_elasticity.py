"""Elasticity driven through the engine, with fake weights and a scripted headroom probe.

What these prove: when headroom falls, the resident widths shrink one level at a time; requests
on widths about to go are moved, between steps and without recompute, only to a subnet of the
same KV layout that fits and that their tier allows (a tier's name list and quality ceiling are
never left), and those that cannot move finish first, so no step ever runs a subnet whose widths
are not resident (the fake runner checks every step against the fake weights). New requests get
only what stays. When headroom returns, growth is prepared in the background and swapped in
between steps once ready. An out-of-memory step shrinks at once (moving or preempting) and is
run again; a second one in the retry, or one with nothing left to shrink, propagates. A request
preempted that way, whose tier allows nothing resident, waits: it never runs outside its tier.
"""

from __future__ import annotations

import pytest

from server.engine.request import RequestStatus
from server.vocabulary.step import DeviceOutOfMemory
from server.vocabulary.subnets import SubnetTable
from tests.engine.harness import (
    FULL,
    MID,
    ROOMY,
    STEADY,
    TABLE,
    TIGHT,
    build,
    family,
    greedy,
    prompt,
    tier,
)

ANY = tier("any")
FULL_ONLY = tier("full-only", ("full",))
MID_FAMILY = tier("mid-family", ("mid", "mid-lite"))
CAPPED = tier("capped", ceiling=55.0)  # at most lite's quality


def headroom(h, free: int) -> None:
    h.probe.set_free(free)
    h.sampler.sample()


def subnets_used(h, rid: str) -> list[str]:
    """The subnet of each token the runner sampled for the request, collapsed to changes."""
    out: list[str] = []
    for name, _ in h.runner.samples.get(rid, []):
        if not out or out[-1] != name:
            out.append(name)
    return out


def test_shrinking_level_by_level_moves_only_within_kv_layout_and_tier_and_waits_for_the_rest():
    """Headroom drops and stays low. Each level goes only when nothing runs on its widths:
    `any` on full moves to lite (full's KV layout), `full-only` may not, so that level waits for
    it to finish; `capped` on lite cannot go up to full, so it finishes before lite's widths
    go; `mid-family` moves to mid-lite. No request fails or is recomputed, and every subnet a
    request ran on is one its tier allows."""
    h = build(elastic=True)
    el = h.elasticity
    reqs = {"a": (ANY, 40), "b": (FULL_ONLY, 6), "c": (MID_FAMILY, 70), "d": (CAPPED, 20)}
    for i, (rid, (t, n)) in enumerate(reqs.items()):
        h.add(rid, prompt(5, seed=i), None, greedy(n), tier=t)
    h.step()
    assert {rid: h.scheduler.requests[rid].subnet.name for rid in reqs} == {
        "a": "full",
        "b": "full",
        "c": "mid",
        "d": "lite",
    }
    finished_at, committed_at = {}, []

    def low(step):
        headroom(h, TIGHT)
        if len(h.ffn.history) > len(committed_at):
            committed_at.append(step)
        for rid, outs in h.outputs.items():
            if outs[-1].finished:
                finished_at.setdefault(rid, step)

    h.run(before_step=low)
    # c, on mid-lite, was the last to run: level 0 waits for the next tick, an idle step's
    assert h.ffn.history == [el.levels[3], el.levels[2], el.levels[1]] and el.target == 0
    assert h.engine.step() == []
    assert h.ffn.history == [el.levels[3], el.levels[2], el.levels[1], el.levels[0]]
    assert el.counters.shrinks == 4 and el.counters.moves == 2
    # level 3 (no full) waited for b; level 2 (no lite) for a and d
    assert committed_at[0] > finished_at["b"]
    assert committed_at[1] > max(finished_at["a"], finished_at["d"])
    assert subnets_used(h, "a") == ["full", "lite"]
    assert subnets_used(h, "b") == ["full"]
    assert subnets_used(h, "c") == ["mid", "mid-lite"]
    assert subnets_used(h, "d") == ["lite"]
    assert el.moved == {"a", "c"}
    for rid, (t, n) in reqs.items():
        used = [TABLE[name] for name in subnets_used(h, rid)]
        assert all(t.allows(s.name, TABLE.scores[s.name]) for s in used), rid
        assert len({s.kv_key for s in used}) == 1, rid
        final = h.final(rid)
        assert final.finish_reason == "length" and final.num_output_tokens == n
        assert h.tokens(rid) == h.sampled(rid) == h.replayed(rid)
    assert h.runner.restarts == {} and h.scheduler.num_preemptions == 0
    h.assert_idle()


def test_a_ceiling_is_never_exceeded_by_a_move_even_to_a_better_scored_subnet():
    """A custom table can score a narrower subnet higher. A request capped at 55 runs on
    wide-low (50); when wide-low's widths go, the KV-compatible subnets that fit are
    narrow-high (59, above the cap) and lite-low (45): it moves to lite-low."""
    table = SubnetTable(
        [
            family("full", 256, 256, 60.0),
            family("wide-low", 256, 192, 50.0),
            family("narrow-high", 256, 64, 59.0),
            family("lite-low", 256, 32, 45.0),
            family("mid", 128, 128, 40.0),
        ]
    )
    h = build(elastic=True, table=table)
    el = h.elasticity
    capped = tier("capped", ceiling=55.0)
    h.add("u", prompt(5), None, greedy(12), tier=capped)
    h.step()
    assert h.scheduler.requests["u"].subnet.name == "wide-low"
    headroom(h, TIGHT)
    h.run(before_step=lambda _: h.sampler.sample())  # a fresh (tight) reading every step
    assert subnets_used(h, "u") == ["wide-low", "lite-low"] and el.moved == {"u"}
    assert el.levels[-3] in h.ffn.history  # the level without wide-low's widths came
    h.assert_idle()


def test_a_preempted_request_whose_subnet_went_is_recomputed_on_one_that_stays():
    """A request preempted for blocks keeps its subnet while waiting, but when a shrink takes
    that subnet away (waiting requests do not hold a shrink up), it is not resumed on it: the
    policy chooses again and it is recomputed on a resident subnet."""
    h = build(elastic=True, num_blocks=300)  # one holds up to 204 blocks: b yields to a
    h.add("a", prompt(12), None, greedy(48), tier=ANY)
    h.add("b", prompt(12, 1), None, greedy(48), tier=ANY)
    while h.scheduler.requests["b"].status != RequestStatus.PREEMPTED:
        h.step()
    assert h.scheduler.requests["b"].subnet.name == "full"
    headroom(h, TIGHT)
    h.step()
    assert h.elasticity.current == 3  # a moved to lite; b, waiting, held nothing up
    headroom(h, STEADY)  # stay at level 3
    h.run()
    assert subnets_used(h, "b") == ["full", "lite"] and subnets_used(h, "a") == ["full", "lite"]
    for rid in ("a", "b"):
        assert h.tokens(rid) == h.replayed(rid) and h.final(rid).finish_reason == "length"
    assert h.runner.restarts.get("b")
    h.assert_idle()


def test_pinned_requests_are_moved_only_by_an_out_of_memory_shrink():
    """The client named the subnet: a headroom shrink waits for a pinned request to finish
    rather than move it; an out-of-memory shrink (no time to wait) moves it within its KV
    layout."""
    h = build(elastic=True)
    h.add("waits", prompt(5), FULL, greedy(6))
    h.step()
    headroom(h, TIGHT)
    h.run()
    assert subnets_used(h, "waits") == ["full"] and h.elasticity.moved == set()
    h = build(elastic=True)
    h.add("moved", prompt(5), FULL, greedy(6))
    h.step()
    h.runner.out_of_memory(1)
    h.run()
    assert subnets_used(h, "moved") == ["full", "lite"] and h.elasticity.moved == {"moved"}
    assert h.final("moved").subnet == "lite"
    h.assert_idle()


def test_new_requests_get_only_what_stays_while_a_shrink_waits():
    """Once a level is chosen to go, its subnets stop being offered even before it goes: a new
    request gets lite while a full-only request still runs on full."""
    h = build(elastic=True)
    h.add("keep", prompt(5), None, greedy(10), tier=FULL_ONLY)
    h.step()
    headroom(h, TIGHT)
    h.step()
    assert h.elasticity.target == 3 and h.elasticity.current == 4
    h.add("new", prompt(5, 1), None, greedy(3), tier=ANY)
    h.step()
    assert h.scheduler.requests["new"].subnet.name == "lite"
    assert h.scheduler.requests["keep"].subnet.name == "full"
    h.run()
    h.engine.step()  # the level waited for "keep"; an idle step's tick lets it go
    assert h.ffn.history == [h.elasticity.levels[3]]
    h.assert_idle()


def test_growth_is_prepared_in_the_background_and_swapped_in_between_steps():
    """From the smallest level with headroom back: each level's widths are prepared in the
    background while steps go on at the old widths; only after the resize reports done is it
    committed (at a step boundary), one level at a time, and new requests then get more."""
    h = build(elastic=True, free_bytes=TIGHT)
    el = h.elasticity
    for _ in range(4):  # nothing runs: each tick with a new reading commits a level down at once
        h.sampler.sample()
        h.engine.step()
    assert el.current == 0 and h.ffn.resident_widths == el.levels[0]
    h.add("r", prompt(5), None, greedy(30), tier=ANY)
    for level in range(1, 5):
        headroom(h, ROOMY)  # a reading taken after the last resize settled
        for _ in range(3):
            h.step()
            assert el.current == level - 1, "committed before the resize was done"
        assert h.ffn.resizes[-1].background and not h.ffn.resizes[-1].done()
        h.ffn.finish_resizes()
        h.step()
        assert el.current == level and h.ffn.resident_widths == el.levels[level]
    assert el.counters.grows == 4
    h.add("late", prompt(5, 1), None, greedy(2), tier=ANY)
    h.run()
    assert subnets_used(h, "late") == ["full"] and subnets_used(h, "r") == ["small"]
    h.assert_idle()


def test_a_tier_with_nothing_resident_waits_and_runs_after_growth():
    """The policy defers (admit=False) a request whose tier allows nothing resident: it waits,
    others run past it, and it runs once its subnet is back."""
    h = build(elastic=True, free_bytes=TIGHT)
    for _ in range(4):
        h.sampler.sample()
        h.engine.step()
    h.add("full-only", prompt(5), None, greedy(3), tier=FULL_ONLY)
    h.add("other", prompt(5, 1), None, greedy(3), tier=ANY)
    for _ in range(5):
        h.step()
    assert h.scheduler.requests["full-only"].status == RequestStatus.WAITING
    assert h.final("other").finish_reason == "length"
    assert h.chooser.deferrals["full-only"] >= 5
    headroom(h, ROOMY)

    def ready(step):
        h.ffn.finish_resizes()
        h.sampler.sample()

    h.run(before_step=ready)
    assert subnets_used(h, "full-only") == ["full"]
    assert h.tokens("full-only") == h.expected("full-only", FULL, greedy(3))
    h.assert_idle()


# ---- out of memory ----------------------------------------------------------------------------


def test_an_out_of_memory_step_shrinks_one_level_and_the_retry_succeeds():
    """The runner runs out of memory once: the engine shrinks one level (moving the request on
    full to lite, its KV intact), runs the step again, and no request fails or is recomputed."""
    h = build(elastic=True)
    h.add("a", prompt(5), None, greedy(8), tier=ANY)
    h.add("m", prompt(5, 1), MID, greedy(8))
    h.step()
    h.runner.out_of_memory(1)
    outs = h.step()
    assert sorted(o.request_id for o in outs) == ["a", "m"]  # the retried step produced tokens
    assert h.runner.oom_raised == 1 and h.elasticity.counters.oom_shrinks == 1
    assert h.elasticity.current == 3 and h.ffn.resident_widths == h.elasticity.levels[3]
    h.run()
    assert subnets_used(h, "a") == ["full", "lite"] and subnets_used(h, "m") == ["mid"]
    assert all(h.final(r).finish_reason == "length" for r in ("a", "m"))
    assert h.runner.restarts == {}
    h.assert_idle()


def test_out_of_memory_preempts_what_cannot_move_and_growth_waits_for_the_cool_down(clock):
    """A request whose tier allows nothing that fits after the shrink is preempted (KV freed)
    and waits, deferred, never resumed on a subnet outside its tier; growth stays off for the
    cool-down even with headroom back; then the widths grow, it is recomputed on full and ends
    with its run-alone tokens."""
    h = build(elastic=True, clock=clock)
    h.add("f", prompt(5), None, greedy(10), tier=FULL_ONLY)
    h.step()
    h.runner.out_of_memory(1)
    h.step()
    f = h.scheduler.requests["f"]
    assert f.status == RequestStatus.PREEMPTED and f.subnet is None
    assert h.blocks.num_held("f") == 0 and h.elasticity.counters.oom_preemptions == 1
    headroom(h, ROOMY)
    for _ in range(5):
        clock.advance(1.0)
        h.step()
    assert h.elasticity.counters.grows == 0 and f.status == RequestStatus.PREEMPTED
    clock.advance(h.elasticity.config.oom_cooldown_s)

    def ready(step):
        h.ffn.finish_resizes()

    h.run(before_step=ready)
    assert h.elasticity.counters.grows == 1 and subnets_used(h, "f") == ["full"]
    assert h.tokens("f") == h.expected("f", FULL, greedy(10))
    assert h.runner.restarts == {"f": 1}
    h.assert_idle()


def test_a_second_out_of_memory_in_the_retry_propagates_and_the_engine_goes_on():
    """Two failed runs in one step: the shrink happened once, the error reaches the caller, and
    nothing was committed, so the next step carries on and every request ends whole."""
    h = build(elastic=True)
    h.add("a", prompt(5), None, greedy(6), tier=ANY)
    h.add("m", prompt(5, 1), MID, greedy(6))
    h.step()
    h.runner.out_of_memory(2)
    with pytest.raises(DeviceOutOfMemory):
        h.step()
    assert h.runner.oom_raised == 2 and h.elasticity.counters.oom_shrinks == 1
    h.run()
    for rid in ("a", "m"):
        assert h.final(rid).finish_reason == "length" and h.tokens(rid) == h.sampled(rid)
    assert h.tokens("m") == h.expected("m", MID, greedy(6))
    h.assert_idle()


def test_out_of_memory_with_nothing_to_shrink_propagates():
    """Without elasticity, or at the smallest level, an out-of-memory step is not retried."""
    fixed = build()
    fixed.add("a", prompt(5))
    fixed.runner.out_of_memory(1)
    with pytest.raises(DeviceOutOfMemory):
        fixed.step()
    assert fixed.runner.oom_raised == 1
    smallest = build(elastic=True, free_bytes=TIGHT)
    for _ in range(4):
        smallest.sampler.sample()
        smallest.engine.step()
    assert not smallest.elasticity.can_shrink
    smallest.add("a", prompt(5), None, tier=ANY)
    smallest.runner.out_of_memory(1)
    with pytest.raises(DeviceOutOfMemory):
        smallest.step()
    assert smallest.runner.oom_raised == 1


def test_out_of_memory_abandons_a_growth_in_flight():
    """A growth being prepared is what memory lacks: an out-of-memory step abandons it (it is
    never committed) and shrinks instead."""
    h = build(elastic=True, free_bytes=TIGHT)
    h.engine.step()  # tick: shrink to level 3 (nothing runs)
    headroom(h, ROOMY)
    h.add("a", prompt(5), None, greedy(6), tier=ANY)
    h.step()  # tick: start growing back to 4
    growing = h.ffn.resizes[-1]
    assert growing.background and not growing.done()
    h.runner.out_of_memory(1)
    h.step()
    assert growing.abandoned and h.elasticity.current == 2
    h.ffn.finish_resizes()
    h.run()
    assert growing.widths not in h.ffn.history
    h.assert_idle()
