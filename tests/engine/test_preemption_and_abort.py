"""Requests leaving early or losing their KV: preemption by recompute, abort, a failing request,
a failed step, and a randomised soak of all of them together.

What these prove: a preempted request is recomputed (from its prompt and the tokens it already
has, or a cached prefix of them) and ends with exactly the tokens it would have had alone; an
abort at any point (waiting, mid-prefill, mid-decode) frees its blocks and its runner state at
once and yields one final "abort" output; a request the runner fails fails alone; and whatever
mix of these happens, every block and every runner registration comes back.
"""

from __future__ import annotations

import random

import pytest

from server.engine.request import RequestStatus
from tests.engine.fake_runner import counting_token
from tests.engine.harness import FULL, LITE, MID, MID_LITE, SMALL, build, greedy, prompt

SUBNETS = [FULL, LITE, MID, MID_LITE, SMALL]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_preemption_by_recompute_gives_identical_tokens_and_frees_everything(prefix_cache):
    """Three long generations in a pool that holds two: the latest is preempted (its KV
    dropped) and recomputed, several times; each still gets its run-alone tokens, only the
    preempted one is recomputed, and the pool ends empty."""
    # at 60 positions a request holds 4 full layers x 15 blocks + 16 sliding x 9 = 204 blocks:
    # two fit in 450, three do not
    h = build(num_blocks=450, block_size=4, prefix_cache=prefix_cache, max_num_batched_tokens=64)
    for i in range(3):
        h.add(f"r{i}", prompt(12, seed=i), SUBNETS[i], greedy(48))
    preempted = []
    while h.engine.has_work:
        h.step()
        preempted += [rid for rid, r in h.scheduler.requests.items() if r.events.preemptions]
    assert h.scheduler.num_preemptions >= 2 and "r0" not in preempted
    for i in range(3):
        assert h.tokens(f"r{i}") == h.expected(f"r{i}", SUBNETS[i], greedy(48))
        assert h.final(f"r{i}").finish_reason == "length"
    assert set(h.runner.restarts) == set(preempted)
    h.assert_idle()


def test_a_preempted_request_resumes_from_its_own_cached_blocks():
    """With prefix caching, a preempted request's full blocks stay cached while the pool allows:
    when it is admitted again its recompute starts past them, at exactly the cached length, and
    the fake runner finds its tokens in them (right tokens, right KV layout)."""
    h = build(num_blocks=280, block_size=4)  # one holds up to 204 blocks: b yields to a
    h.add("a", prompt(12), FULL, greedy(20))
    h.add("b", prompt(12, 1), LITE, greedy(48))
    resumed_at, was_preempted = [], False
    while h.engine.has_work:
        h.step()
        b = h.scheduler.requests.get("b")
        mine = [r for r in h.runner.steps[-1] if r.request_id == "b"]
        if was_preempted and mine:
            resumed_at.append((mine[0].start, b.num_cached_tokens))
        was_preempted = b is not None and b.status.name == "PREEMPTED"
    assert resumed_at, "b was never preempted"
    assert all(start == cached for start, cached in resumed_at)
    assert any(start > 0 for start, _ in resumed_at), "no resume from a cached prefix"
    assert h.tokens("b") == h.expected("b", LITE, greedy(48))
    h.assert_idle()


@pytest.mark.parametrize("when", ["waiting", "mid-prefill", "mid-decode"])
def test_abort_frees_blocks_and_runner_state_at_once_and_ends_with_abort(when):
    """An abort before the request ran, between two prefill chunks, or between decodes: its
    blocks and its runner registration go at once, its final output says "abort" with the
    tokens it had, it never runs again, and the others are unaffected."""
    h = build(max_prefill_chunk=8, max_num_batched_tokens=16, max_num_seqs=1)
    h.add("other", prompt(5), MID, greedy(3))
    h.add("victim", prompt(30, 1), FULL, greedy(20))
    # other: 3 steps; victim: 30 prompt tokens in chunks of 8 (steps 4-7), then a token a step
    steps = {"waiting": 1, "mid-prefill": 5, "mid-decode": 9}[when]
    for _ in range(steps):
        h.step()
    victim = h.scheduler.requests["victim"]
    assert (victim.status == RequestStatus.RUNNING) == (when != "waiting")
    assert (0 < victim.num_computed_tokens < 30) == (when == "mid-prefill")
    held_before = h.blocks.num_held("victim")
    out = h.engine.abort("victim")
    assert out.finished and out.finish_reason == "abort" and out.error is None
    assert h.blocks.num_held("victim") == 0 and (held_before > 0) == (when != "waiting")
    assert "victim" not in h.runner.live and "victim" not in h.scheduler.requests
    assert out.num_output_tokens == len(h.tokens("victim"))
    assert (out.num_output_tokens > 0) == (when == "mid-decode")
    assert h.engine.abort("victim") is None and h.engine.abort("nobody") is None
    h.run()
    assert h.tokens("other") == h.expected("other", MID, greedy(3))
    assert not any(r.request_id == "victim" for s in h.runner.steps[steps:] for r in s)
    h.assert_idle()


def test_abort_releases_text_held_back_as_a_possible_stop_string():
    """Text held back because it may start a stop string is final at an abort: the aborted
    output's text joins to everything the tokens say."""
    h = build(next_token=counting_token)
    h.add("r", [ord("a")], FULL, greedy(10, stop=("dX",)))
    for _ in range(3):
        h.step()
    assert "".join(o.text for o in h.outputs["r"]) == "bc"  # "d" is held: it may start "dX"
    out = h.engine.abort("r")
    assert out.text == "d" and out.finish_reason == "abort"


def test_a_failing_request_fails_alone_and_frees_its_blocks():
    """The runner reports an error for one request mid-decode: that request alone ends with
    "error" and the runner's message, its blocks return, the others finish untouched."""
    h = build()
    for i, sn in enumerate(SUBNETS):
        h.add(f"r{i}", prompt(6, seed=i), sn, greedy(8))
    h.runner.fail("r2", "boom", at_position=9)
    h.run()
    bad = h.final("r2")
    assert (bad.finish_reason, bad.error) == ("error", "boom")
    # the prefill and positions 6, 7, 8 each sampled a token; the step computing 9 failed
    assert h.tokens("r2") == h.expected("r2", MID, greedy(8))[:4]
    for i, sn in enumerate(SUBNETS):
        if i != 2:
            assert h.tokens(f"r{i}") == h.expected(f"r{i}", sn, greedy(8))
            assert h.final(f"r{i}").finish_reason == "length"
    h.assert_idle()


def test_a_failed_request_stays_failed_when_its_held_text_completes_a_stop_string():
    """Bytes held back at a failure are released in the final output; if they complete a stop
    string, the request still failed: "error" with the runner's message, not "stop"."""
    two_bytes = list("é".encode())
    h = build(next_token=lambda subnet, ctx: two_bytes[(len(ctx) - 1) % 2])
    h.add("r", [ord("A")], FULL, greedy(10, stop=("é",)))
    h.runner.fail("r", "boom", at_position=3)
    h.run()
    final = h.final("r")
    assert (final.finish_reason, final.error) == ("error", "boom")
    h.assert_idle()


def test_fail_running_fails_the_running_requests_and_the_waiting_ones_run_later():
    """After a step fails as a whole (the async engine calls fail_running), every running
    request ends with the error and frees its blocks; the queue is kept and served."""
    h = build(max_num_seqs=2)
    for i in range(4):
        h.add(f"r{i}", prompt(5, seed=i), FULL, greedy(4))
    h.step()
    outs = h.engine.fail_running("RuntimeError: step exploded")
    assert sorted(o.request_id for o in outs) == ["r0", "r1"]
    assert all(o.finish_reason == "error" and "exploded" in o.error for o in outs)
    h.collect(outs)
    h.run()
    for rid in ("r2", "r3"):
        assert h.tokens(rid) == h.expected(rid, FULL, greedy(4))
    h.assert_idle()


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_with_preemption_aborts_and_failures_stays_exact(seed):
    """Seeded soak: requests on random subnets with shared prompt prefixes arrive over time into
    a pool too small for all of them; some are aborted at random moments, some fail. Every
    request gets exactly one final output; every one that ran to its length has its run-alone
    tokens; the others a prefix of them; no contract is broken; nothing is left held."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8])
    # about 1.5 times the most one request (24 + 24 positions) can hold: preemption is certain
    h = build(
        num_blocks={2: 560, 4: 300, 8: 160}[block_size],
        block_size=block_size,
        max_num_seqs=rng.choice([3, 6, 12]),
        max_num_batched_tokens=rng.choice([16, 32, 64]),
        max_prefill_chunk=rng.choice([4, 8, 16]),
        prefix_cache=rng.random() < 0.7,
    )
    stems = [prompt(rng.randint(4, 16), seed=s) for s in range(3)]
    plan = {}
    for i in range(30):
        p = rng.choice(stems)[: rng.randint(2, 16)] + prompt(rng.randint(1, 8), seed=100 + i)
        plan[f"q{i}"] = (p, rng.choice(SUBNETS), greedy(rng.randint(1, 24)))
    failing = set(rng.sample(sorted(plan), 3))
    for rid in failing:
        h.runner.fail(rid, "injected", at_position=rng.randint(0, 30))
    pending, aborted = list(plan), set()

    def traffic(step):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if pending:
                rid = pending.pop(0)
                p, sn, params = plan[rid]
                h.add(rid, p, sn, params)
        live = sorted(h.scheduler.requests)
        if live and rng.random() < 0.15:
            rid = rng.choice(live)
            aborted.add(rid)
            h.collect([h.engine.abort(rid)])
        if not h.engine.has_work and pending:
            traffic(step)

    h.run(before_step=traffic)
    assert not pending
    for rid, (_, sn, params) in plan.items():
        final = h.final(rid)
        want = h.expected(rid, sn, params)
        got = h.tokens(rid)
        assert got == h.sampled(rid), rid  # the engine delivered what the runner sampled
        if final.finish_reason == "length":
            assert got == want, rid
        else:
            assert final.finish_reason in ("abort", "error") and got == want[: len(got)], rid
            assert rid in aborted | failing
    assert h.scheduler.num_preemptions > 0
    h.assert_idle()
