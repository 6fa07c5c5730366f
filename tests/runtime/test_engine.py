"""The serving engine on the tiny dev model: continuous batching of mixed-subnet requests.

Proves: concurrent greedy requests over six subnets, arriving at different steps, give exactly
what each gives alone; seeded sampling reproduces across runs and batch compositions; every KV
block comes back after finishes, aborts and preemptions; the prefix cache hits only within a KV
layout class and never changes outputs; the asyncio face streams, aborts, isolates a failing
request and keeps the event loop free while steps compute.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.engine.assembly import assemble_engine
from server.engine.async_engine import AsyncEngine
from server.engine.engine import Engine
from server.engine.offline import GenerationRequest
from server.engine.scheduler import SchedulerConfig
from server.vocabulary.sampling_params import SamplingParams
from tests.runtime.conftest import alone, prompt_ids

SUBNETS = ["full", "e2b", "e2.98b-layer", "mix-0.75", "skip-3-7", "skip-30-33"]
MB = 1024 * 1024


def engine(rt, kv_mb: float = 8, **cfg) -> Engine:
    config = SchedulerConfig(
        **{
            "max_num_seqs": 16,
            "max_num_batched_tokens": 64,
            "max_prefill_chunk": 32,
            "max_model_len": 2048,
            **cfg,
        }
    )
    return assemble_engine(rt, int(kv_mb * MB), config, block_size=8)


def run(eng: Engine, arrivals: dict[int, list[tuple]], max_steps: int = 2000):
    """Step the engine, adding (request_id, prompt, subnet, params) at their arrival step."""
    outputs: dict[str, list[int]] = {}
    finished: dict[str, object] = {}
    for step in range(max_steps):
        for rid, prompt, subnet, params in arrivals.get(step, []):
            eng.add_request(rid, prompt, eng_subnet(eng, subnet), params)
        if step > max(arrivals) and not eng.has_work:
            return outputs, finished
        for out in eng.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError("engine did not finish")


def eng_subnet(eng: Engine, name):
    return name if not isinstance(name, str) else _TABLE[name]


_TABLE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _table(tiny):
    _TABLE.update({s.name: s for s in tiny.subnets})


def test_24_concurrent_greedy_requests_equal_their_runs_alone(tiny):
    arrivals: dict[int, list[tuple]] = {}
    specs = []
    for i in range(24):
        subnet = SUBNETS[i % len(SUBNETS)]
        prompt = prompt_ids(5 + (i * 7) % 60, seed=100 + i)
        max_tokens = 8 + i % 7
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        arrivals.setdefault(i // 3, []).append((f"r{i}", prompt, subnet, params))
        specs.append((f"r{i}", prompt, subnet, max_tokens))
    eng = engine(tiny)
    outputs, finished = run(eng, arrivals)
    assert len(finished) == 24
    for rid, prompt, subnet, max_tokens in specs:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        by_itself = alone(tiny, GenerationRequest(tiny.subnets[subnet], prompt, params))
        assert outputs[rid] == by_itself.token_ids, f"{rid} ({subnet}) differs from its run alone"
    assert eng.scheduler.blocks.num_free_blocks == eng.scheduler.blocks.num_blocks


def test_seeded_sampling_reproduces_across_runs_and_batch_compositions(tiny):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    prompt = prompt_ids(20, seed=9)

    def once(extra: list[tuple]) -> list[int]:
        eng = engine(tiny)
        arrivals = {0: [("seeded", prompt, "mix-0.75", params)]}
        for k, item in enumerate(extra):
            arrivals.setdefault(k % 3, []).append(item)
        outputs, _ = run(eng, arrivals)
        return outputs["seeded"]

    alone = once([])
    assert alone == once([])
    crowd = [
        (
            f"x{i}",
            prompt_ids(10 + i, seed=i),
            SUBNETS[i % 6],
            SamplingParams(max_tokens=6 + i, temperature=1.0),
        )
        for i in range(6)
    ]
    assert alone == once(crowd)
    assert alone == once(crowd[::-1][:3])
    other_seed = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=99)
    eng = engine(tiny)
    outputs, _ = run(eng, {0: [("other", prompt, "mix-0.75", other_seed)]})
    assert outputs["other"] != alone


def test_every_sampling_parameter_runs_on_the_runners_logits(tiny):
    # The runner's logits are inference tensors, which the sampler adjusts in place for
    # penalties, bias and min_tokens (and restores): each kind of request, batched together
    # over several subnets, finishes as it does alone.
    requests = {
        "penalties": SamplingParams(
            max_tokens=8,
            seed=1,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.5,
            logit_bias={300: 1.5},
        ),
        "min_tokens": SamplingParams(max_tokens=8, min_tokens=8, seed=2, temperature=0.8),
        "forced": SamplingParams(max_tokens=4, seed=3, logit_bias={321: 100.0}),
        "min_p": SamplingParams(max_tokens=8, seed=4, min_p=0.1),
        "top_p": SamplingParams(max_tokens=8, seed=5, top_p=0.8),
        "logprobs": SamplingParams(max_tokens=8, seed=6, logprobs=3, top_k=20),
        "greedy": SamplingParams(max_tokens=8, temperature=0, logit_bias={7: -5.0}),
    }
    prompts = {rid: prompt_ids(12 + i, seed=i) for i, rid in enumerate(requests)}
    subnets = {rid: SUBNETS[i % len(SUBNETS)] for i, rid in enumerate(requests)}
    arrivals = {0: [(rid, prompts[rid], subnets[rid], p) for rid, p in requests.items()]}
    outputs, finished = run(engine(tiny), arrivals)
    assert outputs["forced"] == [321] * 4
    for rid, params in requests.items():
        assert finished[rid].finish_reason == "length", (rid, finished[rid])
        request = GenerationRequest(tiny.subnets[subnets[rid]], prompts[rid], params)
        assert outputs[rid] == alone(tiny, request).token_ids, rid


def test_every_block_returns_after_finishes_aborts_and_preemptions(tiny):
    # A pool so small that the requests cannot all hold their KV: preemption must happen.
    eng = engine(tiny, kv_mb=0.4, max_num_seqs=8)
    blocks = eng.scheduler.blocks
    for i in range(8):
        eng.add_request(
            f"p{i}",
            prompt_ids(30 + i, seed=i),
            tiny.subnets[SUBNETS[i % 6]],
            SamplingParams(max_tokens=40, temperature=0.0),
        )
    steps = 0
    while eng.has_work:
        eng.step()
        steps += 1
        if steps == 5:
            assert eng.abort("p1") is not None and eng.abort("p6") is not None
        assert steps < 3000
    assert eng.scheduler.num_preemptions > 0
    assert blocks.num_free_blocks == blocks.num_blocks
    assert all(c == 0 for c in blocks.ref_count)
    assert eng.runner.states == {}


def test_a_subnet_that_skips_kv_layers_books_fewer_blocks(tiny):
    eng = engine(tiny, max_num_batched_tokens=256, max_prefill_chunk=128)
    prompt = prompt_ids(40, seed=3)
    for rid, name in (("full", "full"), ("skip", "skip-3-7"), ("e2b", "e2b")):
        eng.add_request(rid, prompt, tiny.subnets[name], SamplingParams(max_tokens=4))
    eng.step()  # admits and prefills all three
    held = {rid: eng.scheduler.blocks.num_held(rid) for rid in ("full", "skip", "e2b")}
    assert held["skip"] == held["full"] * 18 // 20  # layers 3 and 7 own no blocks
    assert held["e2b"] == held["full"]  # skipping consumers 20..24 changes no KV booking


def test_prefix_cache_hits_only_within_a_kv_layout_and_never_changes_outputs(tiny):
    prompt = prompt_ids(45, seed=11)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)

    def serve(eng, rid, subnet):
        outputs, finished = run(eng, {0: [(rid, prompt, subnet, greedy)]})
        return outputs[rid], finished[rid].num_cached_tokens

    cached = engine(tiny)
    first, hit0 = serve(cached, "a", "e2b")
    again, hit1 = serve(cached, "b", "e2b")
    same_layout, hit2 = serve(cached, "c", "skip-30-33")  # same KV layer widths as e2b
    other_layout, hit3 = serve(cached, "d", "full")
    assert hit0 == 0 and hit1 == 40 and hit2 == 40 and hit3 == 0
    assert cached.scheduler.blocks.prefix_hits == 80
    uncached = assemble_engine(
        tiny, 8 * MB, cached.scheduler.config, block_size=8, enable_prefix_cache=False
    )
    assert again == first == serve(uncached, "e", "e2b")[0]
    assert same_layout == serve(uncached, "f", "skip-30-33")[0]
    assert other_layout == serve(uncached, "g", "full")[0]


def test_stop_strings_are_applied_on_text(tiny):
    eng = engine(tiny)
    prompt = prompt_ids(12, seed=21)
    outputs, _ = run(
        eng, {0: [("free", prompt, "full", SamplingParams(max_tokens=12, temperature=0.0))]}
    )
    full_text = tiny.tokenizer.decode(outputs["free"])
    stop = full_text[3:5]
    assert stop and stop in full_text
    eng = engine(tiny)
    texts: dict[str, str] = {}
    eng.add_request(
        "s",
        prompt,
        tiny.subnets["full"],
        SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)),
    )
    while eng.has_work:
        for out in eng.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            last = out
    assert texts["s"] == full_text[: full_text.index(stop)]
    assert last.finish_reason == "stop" and last.stop_reason == stop


# ---- the asyncio face ---------------------------------------------------------------------------


def test_async_streams_abort_on_disconnect_and_isolate_a_failing_request(tiny, monkeypatch):
    eng = engine(tiny)
    forward, make_batch = tiny.model.forward, tiny.model.batch
    in_step = threading.Event()
    # The batches holding the failing subnet, held: an id is unique only while its object lives,
    # and a later batch may be allocated where a freed one was.
    failing: list = []

    def marked(planned):
        batch = make_batch(planned)
        if any(seg.subnet.name == "skip-3-7" for seg in planned.segments):
            failing.append(batch)
        return batch

    def guarded(batch, kv):
        in_step.set()
        time.sleep(0.02)  # a step long enough for the event loop to be seen running during it
        try:
            if any(batch is b for b in failing):
                raise RuntimeError("injected failure for skip-3-7")
            return forward(batch, kv)
        finally:
            in_step.clear()

    monkeypatch.setattr(tiny.model, "batch", marked)
    monkeypatch.setattr(tiny.model, "forward", guarded)

    async def scenario():
        aeng = AsyncEngine(eng)
        await aeng.start()
        ticks_during_steps = 0

        async def ticker():
            nonlocal ticks_during_steps
            while True:
                await asyncio.sleep(0.002)
                if in_step.is_set():
                    ticks_during_steps += 1

        tick = asyncio.create_task(ticker())
        greedy = SamplingParams(max_tokens=10, temperature=0.0)
        good = aeng.add_request(prompt_ids(15, seed=1), tiny.subnets["e2b"], greedy)
        bad = aeng.add_request(prompt_ids(15, seed=2), tiny.subnets["skip-3-7"], greedy)
        leaving = aeng.add_request(
            prompt_ids(15, seed=3),
            tiny.subnets["full"],
            SamplingParams(max_tokens=50, temperature=0.0),
        )

        async def collect(stream, stop_after=None):
            outs = []
            async for out in stream:
                outs.append(out)
                if stop_after and len(outs) == stop_after:
                    break  # the client goes away
            return outs

        good_outs, bad_outs, leaving_outs = await asyncio.gather(
            collect(good), collect(bad), collect(leaving, stop_after=3)
        )
        for _ in range(200):  # the abort is applied at the next step boundary
            if aeng.num_in_flight == 0 and not eng.has_work:
                break
            await asyncio.sleep(0.01)
        tick.cancel()
        await aeng.stop()
        return good_outs, bad_outs, leaving_outs, ticks_during_steps, aeng

    good_outs, bad_outs, leaving_outs, ticks, aeng = asyncio.run(scenario())
    assert good_outs[-1].finished and good_outs[-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in good_outs) == 10
    assert bad_outs[-1].finish_reason == "error" and "injected" in bad_outs[-1].error
    assert len(leaving_outs) == 3 and not leaving_outs[-1].finished
    assert not eng.scheduler.requests  # the leaving request was aborted and is gone
    blocks = eng.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and eng.runner.states == {}
    assert ticks > 0, "the event loop did not run while a step was computing"
    assert aeng.dead is None


def test_async_rejects_impossible_requests_before_streaming(tiny):
    eng = engine(tiny)

    async def scenario():
        aeng = AsyncEngine(eng)
        await aeng.start()
        try:
            with pytest.raises(ValueError, match="context length"):
                aeng.add_request(
                    prompt_ids(2000), tiny.subnets["full"], SamplingParams(max_tokens=100)
                )
            with pytest.raises(ValueError, match="top_p"):
                aeng.add_request(prompt_ids(5), tiny.subnets["full"], SamplingParams(top_p=0))
        finally:
            await aeng.stop()

    asyncio.run(scenario())
