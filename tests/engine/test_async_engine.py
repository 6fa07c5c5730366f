"""The asyncio face of the engine (AsyncEngine, RequestStream) over the fake runner.

What these prove: each request's stream yields its token and text deltas and ends with one
finished output; a consumer that goes away (breaks out, closes the stream, is cancelled) aborts
its request and frees its KV; adds and aborts from the event loop are applied by the step
thread between steps only (never while the runner runs: the fake runner records any call that
overlaps another); a step that fails as a whole fails its running requests and the loop goes
on; and after any mix of the above nothing is left: no block, no running request, no stream.

Plain tests that call asyncio.run (no pytest plugin); real time, steps of no duration.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from server.engine.async_engine import AsyncEngine
from server.engine.outputs import RequestOutput
from tests.engine.harness import (
    FULL,
    LITE,
    MID,
    MID_LITE,
    ROOMY,
    SMALL,
    TIGHT,
    build,
    greedy,
    prompt,
)

SUBNETS = [FULL, LITE, MID, MID_LITE, SMALL]


def harness(**kw):
    h = build(step_seconds=0.0, **kw)
    aeng = AsyncEngine(h.engine)
    aeng.on_finished.append(lambda out: out.finish_reason == "abort" and h.aborted.append(out))
    return h, aeng


async def settle(aeng: AsyncEngine, timeout: float = 5.0) -> None:
    """Wait until the loop has nothing left: no work, no queued operation, no open stream."""
    deadline = time.monotonic() + timeout
    while aeng.engine.has_work or aeng._ops or aeng.num_in_flight:
        assert time.monotonic() < deadline, "the async engine did not settle"
        await asyncio.sleep(0.001)


async def drain(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_streams_yield_deltas_and_end_with_one_finished_output():
    """Concurrent streams on mixed subnets: each yields one delta per token, its run-alone
    tokens, and ends with exactly one finished output; first() peeks without consuming."""
    h, aeng = harness()

    async def main():
        await aeng.start()
        streams = {}
        for i, sn in enumerate(SUBNETS):
            h.prompts[f"r{i}"] = prompt(7, seed=i)
            streams[f"r{i}"] = aeng.add_request(h.prompts[f"r{i}"], sn, greedy(5), f"r{i}")
        head = await streams["r0"].first()
        drained = await asyncio.gather(*map(drain, streams.values()))
        results = dict(zip(streams, drained, strict=True))
        assert results["r0"][0] is head
        for i, sn in enumerate(SUBNETS):
            outs = results[f"r{i}"]
            assert [len(o.token_ids) for o in outs] == [1] * 5
            assert [o.finished for o in outs] == [False] * 4 + [True]
            assert tokens(outs) == h.expected(f"r{i}", sn, greedy(5))
            assert "".join(o.text for o in outs) == "".join(map(chr, tokens(outs)))
        await settle(aeng)
        await aeng.stop()

    asyncio.run(main())
    h.assert_idle()


@pytest.mark.parametrize("how", ["break", "close", "cancel"])
def test_a_consumer_going_away_aborts_its_request_and_frees_its_kv(how):
    """Breaking out of the stream, closing it, or cancelling the task reading it aborts the
    request: its blocks and its runner state are freed, the others finish untouched."""
    h, aeng = harness()

    async def main():
        await aeng.start()
        gone = aeng.add_request(prompt(8), FULL, greedy(400), "gone")
        h.prompts["stay"] = prompt(8, 1)
        stay = aeng.add_request(h.prompts["stay"], MID, greedy(30), "stay")
        got = []

        async def consume():
            async for out in gone:
                got.append(out)
                if len(got) == 3 and how == "break":
                    break
                if len(got) == 3 and how == "close":
                    gone.close()
                    return

        task = asyncio.create_task(consume())
        if how == "cancel":
            while len(got) < 3:
                await asyncio.sleep(0.001)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stay_outs = await drain(stay)
        await settle(aeng)
        assert len(h.aborted) == 1 and h.scheduler.num_preemptions == 0
        assert tokens(stay_outs) == h.expected("stay", MID, greedy(30))
        assert len(h.runner.samples["gone"]) < 400
        await aeng.stop()

    asyncio.run(main())
    assert "gone" in h.runner.released
    h.assert_idle()


def test_adds_and_aborts_are_applied_between_steps_only():
    """While the runner is inside a step, an add and an abort from the event loop change
    nothing in the engine; both are applied before the next step (the abort's final output
    says "abort"), and no runner call ever overlapped another."""
    h, aeng = harness()
    inside, release = threading.Event(), threading.Event()
    seen_in_step = []

    def hold(seqs):
        if release.is_set():
            return
        seen_in_step.append(sorted(s.request_id for s in seqs))
        inside.set()
        assert release.wait(5)

    async def main():
        await aeng.start()
        running = aeng.add_request(prompt(5), FULL, greedy(50), "running")
        await running.first()  # it has run a step
        h.runner.before_execute = hold
        while not inside.is_set():
            await asyncio.sleep(0.001)
        # the step thread is inside execute now
        late = aeng.add_request(prompt(5, 1), MID, greedy(2), "late")
        aeng.abort("running")
        await asyncio.sleep(0.02)
        assert "late" not in h.scheduler.requests and "late" not in h.runner.live
        assert h.scheduler.requests["running"].status.name == "RUNNING"
        assert len(aeng._ops) == 2
        release.set()
        outs = await drain(running)
        late_outs = await drain(late)
        assert outs[-1].finish_reason == "abort"
        assert late_outs[-1].finish_reason == "length"
        await settle(aeng)
        await aeng.stop()

    asyncio.run(main())
    assert seen_in_step == [["running"]]
    h.assert_idle()


def test_many_concurrent_requests_with_random_cancellations_leave_nothing_behind():
    """Sixty requests on random subnets in a small pool (so some are preempted), read by
    consumers that finish, break early, close, or are cancelled at random: every completed
    one has its run-alone tokens, and afterwards no block, request, runner state or stream is
    left."""
    rng = random.Random(7)
    h, aeng = harness(num_blocks=450, max_num_seqs=12)  # a request holds up to 196 blocks
    plan = {
        f"q{i}": (
            prompt(rng.randint(2, 20), seed=i),
            rng.choice(SUBNETS),
            greedy(rng.randint(1, 30)),
        )
        for i in range(60)
    }
    fates = {rid: rng.choice(["read", "read", "break", "close", "cancel"]) for rid in plan}

    async def main():
        await aeng.start()
        results, tasks = {}, []

        async def consume(rid, stream, fate, after):
            outs = []
            async for out in stream:
                outs.append(out)
                if fate == "break" and len(outs) >= after:
                    break
                if fate == "close" and len(outs) >= after:
                    stream.close()
                    break
            results[rid] = outs

        for rid, (p, sn, params) in plan.items():
            h.prompts[rid] = p
            stream = aeng.add_request(p, sn, params, rid)
            task = asyncio.create_task(consume(rid, stream, fates[rid], rng.randint(1, 5)))
            tasks.append((rid, task))
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        for rid, task in tasks:
            if fates[rid] == "cancel" and rng.random() < 0.8:
                await asyncio.sleep(rng.random() * 0.002)
                task.cancel()
        await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
        await settle(aeng)
        await aeng.stop()
        return results

    results = asyncio.run(main())
    assert h.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    completed = 0
    for rid, outs in results.items():
        if fates[rid] == "read":
            _, sn, params = plan[rid]
            assert tokens(outs) == h.expected(rid, sn, params), rid
            assert outs[-1].finish_reason == "length"
            completed += 1
    assert completed > 10 and h.aborted
    h.assert_idle()


def test_a_step_that_fails_as_a_whole_fails_its_requests_and_the_loop_goes_on():
    """An unexpected error in a step (not one request's) fails the requests that were running,
    with the error; the loop stays alive and serves the next request."""
    h, aeng = harness()
    armed = [True]

    def explode(seqs):
        if armed[0]:
            armed[0] = False
            raise RuntimeError("step exploded")

    async def main():
        await aeng.start()
        h.runner.before_execute = explode
        doomed = await drain(aeng.add_request(prompt(5), FULL, greedy(5), "doomed"))
        assert doomed[-1].finish_reason == "error" and "exploded" in doomed[-1].error
        h.prompts["next"] = prompt(5, 1)
        fine = await drain(aeng.add_request(h.prompts["next"], LITE, greedy(5), "next"))
        assert tokens(fine) == h.expected("next", LITE, greedy(5))
        assert aeng.dead is None
        await settle(aeng)
        await aeng.stop()

    asyncio.run(main())
    h.assert_idle()


def test_requests_that_can_never_run_are_refused_before_any_stream():
    """Bad parameters, a prompt too long for the pool, or a duplicate id raise at add_request,
    on the caller's side, and leave no stream and no queued operation."""
    h, aeng = harness(num_blocks=100)

    async def main():
        await aeng.start()
        aeng.add_request(prompt(3), FULL, greedy(10), "taken")
        for p, params, rid in (
            (prompt(3), greedy(0), None),
            (prompt(60), greedy(10), None),
            (prompt(3), greedy(1), "taken"),
        ):
            with pytest.raises(ValueError):
                aeng.add_request(p, FULL, params, rid)
        assert aeng.num_in_flight == 1
        aeng.abort("taken")
        await settle(aeng)
        await aeng.stop()

    asyncio.run(main())
    h.assert_idle()


def test_observers_see_every_step_and_each_finished_request_once():
    """on_step observers run after every step, on_finished once per finished request."""
    _, aeng = harness()
    finished, steps = [], []
    aeng.on_finished.append(lambda out: finished.append(out.request_id))
    aeng.on_step.append(lambda engine: steps.append(engine.last_step.num_seqs))

    async def main():
        await aeng.start()
        streams = [aeng.add_request(prompt(4, i), FULL, greedy(3), f"r{i}") for i in range(3)]
        await asyncio.gather(*map(drain, streams))
        await settle(aeng)
        await aeng.stop()

    asyncio.run(main())
    assert sorted(finished) == ["r0", "r1", "r2"]
    assert sum(steps) == 9  # three requests, three steps' worth of sequences each


def test_an_idle_engine_still_follows_the_headroom():
    """With no request at all, headroom falling under the low-water mark still shrinks the
    resident widths, a level per idle tick that has a reading taken after the last resize (the
    sampler, running on its thread, is asked for one after each): the memory goes back to
    whoever needs it."""
    h = build(step_seconds=0.0, elastic=True)
    h.probe.set_free(TIGHT)
    h.sampler.interval_s = 60.0  # readings come only when elasticity asks for one
    aeng = AsyncEngine(h.engine, idle_tick_s=0.005)

    async def main():
        await aeng.start()
        h.sampler.start()
        h.sampler.request()
        deadline = time.monotonic() + 5
        while h.elasticity.current > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await aeng.stop()
        h.sampler.stop()

    asyncio.run(main())
    assert h.elasticity.current == 0 and h.ffn.resident_widths == h.elasticity.levels[0]
    assert h.ffn.releases == 4  # each shrink gave its cached blocks back


def test_a_request_that_cannot_run_yet_does_not_spin_the_loop():
    """A request waiting for a subnet that is not resident (widths shrunk for lack of memory)
    makes steps that run nothing; the loop pauses between them (blocked_retry_s) instead of
    spinning, and the request runs once the widths grow back."""
    h = build(step_seconds=0.0, elastic=True)
    h.probe.set_free(TIGHT)
    h.sampler.interval_s = 0.01  # readings on the sampler's thread, as in the server
    aeng = AsyncEngine(h.engine, idle_tick_s=0.005, blocked_retry_s=0.02)
    steps = {"n": 0}
    step = h.engine.step

    def counted():
        steps["n"] += 1
        return step()

    h.engine.step = counted

    async def main():
        await aeng.start()
        h.sampler.start()
        deadline = time.monotonic() + 5
        while h.elasticity.current > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert h.elasticity.current == 0
        stream = aeng.add_request(prompt(8), FULL, greedy(3), "pinned-full")
        before = steps["n"]
        await asyncio.sleep(0.3)
        waited = steps["n"] - before
        assert "pinned-full" in h.scheduler.requests and not h.scheduler.running
        h.probe.set_free(ROOMY)

        async def uploads():  # the background growths finish when their "upload" does
            while True:
                h.ffn.finish_resizes()
                await asyncio.sleep(0.005)

        uploading = asyncio.create_task(uploads())
        outs = await asyncio.wait_for(drain(stream), 10)
        uploading.cancel()
        await aeng.stop()
        h.sampler.stop()
        return waited, outs

    waited, outs = asyncio.run(main())
    # 0.3 s at one retry per 20 ms is ~15 steps (plus the idle ticks before the add); a loop
    # that spins makes thousands of empty steps in that time on any machine.
    assert waited < 100, waited
    assert outs[-1].finish_reason == "length" and len(tokens(outs)) == 3
