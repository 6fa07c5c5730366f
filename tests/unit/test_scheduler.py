"""The scheduler, without torch: budgets, chunked prefill, admission, preemption, abort, stops."""

from __future__ import annotations

import pytest

from policies.ordering import FirstComeFirstServed, PriorityOrder, WaitingRequest
from server.engine.request import RequestStatus
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.unit.engine_fixtures import blocks, request, small_text, subnet

TEXT = small_text()
FULL = subnet(TEXT)


def make(num_blocks=2000, **cfg) -> Scheduler:
    config = SchedulerConfig(
        **{
            "max_num_seqs": 8,
            "max_num_batched_tokens": 64,
            "max_prefill_chunk": 32,
            "max_model_len": 1024,
            **cfg,
        }
    )
    return Scheduler(config, blocks(TEXT, num_blocks), FirstComeFirstServed(), eos_token_ids=(1,))


def run_step(s: Scheduler, token: int = 50):
    plan = s.schedule()
    sampled = {c.request_id: token for c in plan.sequences if c.sample}
    return plan, s.update(plan, sampled)


def test_prefill_then_decode():
    s = make()
    r = request(FULL, list(range(10, 30)), max_tokens=3)
    s.add(r)
    plan, _ = run_step(s)
    assert [(c.start, c.num_tokens, c.sample) for c in plan.sequences] == [(0, 20, True)]
    plan, _ = run_step(s)
    assert [(c.start, c.num_tokens) for c in plan.sequences] == [(20, 1)]
    run_step(s)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.output_token_ids == [50, 50, 50]
    assert not s.has_work and s.blocks.num_free_blocks == 2000


def test_long_prompt_is_chunked_and_never_delays_running_decodes_more_than_one_chunk():
    s = make()
    decoders = [request(FULL, list(range(10, 15)), max_tokens=50) for _ in range(3)]
    for r in decoders:
        s.add(r)
    run_step(s)  # their prefills
    long = request(FULL, list(range(100, 200)), max_tokens=2)
    s.add(long)
    chunks_of_long = []
    for _ in range(5):
        plan, _ = run_step(s)
        by_id = {c.request_id: c for c in plan.sequences}
        # every running decode is in every step, with its one token
        assert all(by_id[r.request_id].num_tokens == 1 for r in decoders)
        if long.request_id in by_id:
            c = by_id[long.request_id]
            assert c.num_tokens <= 32  # one chunk at most per step
            chunks_of_long.append((c.start, c.num_tokens, c.sample))
        assert plan.num_tokens <= 64
    assert chunks_of_long[:4] == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]


def test_token_budget_caps_admission():
    s = make(max_num_batched_tokens=40, max_prefill_chunk=40)
    a, b = (request(FULL, list(range(10, 40))) for _ in range(2))
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [(c.request_id, c.num_tokens) for c in plan.sequences] == [
        (a.request_id, 30),
        (b.request_id, 10),
    ]


def test_max_num_seqs():
    s = make(max_num_seqs=2, max_num_batched_tokens=64)
    reqs = [request(FULL, [5, 6]) for _ in range(3)]
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    assert len(plan.sequences) == 2 and reqs[2] in s.waiting


def test_admission_limited_by_free_blocks_without_overtaking():
    s = make(num_blocks=100)  # a 30-token prompt needs 20 x 4 = 80 blocks
    first = request(FULL, list(range(10, 40)), max_tokens=1)
    second = request(FULL, list(range(10, 40)), max_tokens=1)
    small = request(FULL, [3, 4], max_tokens=1)
    for r in (first, second, small):
        s.add(r)
    plan = s.schedule()
    assert [c.request_id for c in plan.sequences] == [first.request_id]
    assert second in s.waiting and small in s.waiting  # small does not overtake second


def test_preemption_by_recompute_when_blocks_run_out_and_everything_is_freed():
    s = make(num_blocks=150, max_num_batched_tokens=64)  # each needs up to 104 alone
    a = request(FULL, list(range(10, 17)), max_tokens=40)  # 20 blocks each to start
    b = request(FULL, list(range(20, 27)), max_tokens=40)
    s.add(a)
    s.add(b)
    preempted = []
    for _ in range(200):
        plan, _ = run_step(s)
        preempted += plan.preempted
        if not s.has_work:
            break
    assert preempted, "the pool was too small for both: one must have been preempted"
    assert b.request_id in preempted  # the later request yields
    assert a.status == b.status == RequestStatus.FINISHED_LENGTH
    assert len(a.output_token_ids) == len(b.output_token_ids) == 40
    assert b.events.preemptions >= 1
    assert s.blocks.num_free_blocks == 150


def test_abort_frees_at_once():
    s = make()
    r = request(FULL, list(range(10, 40)), max_tokens=20)
    s.add(r)
    run_step(s)
    assert s.blocks.num_free_blocks < 2000
    assert s.abort(r.request_id) is r
    assert r.status == RequestStatus.FINISHED_ABORTED
    assert s.blocks.num_free_blocks == 2000 and not s.has_work
    assert s.abort(r.request_id) is None


def test_stops_on_eos_stop_token_and_respects_min_tokens():
    s = make()
    eos = request(FULL, [5, 6], max_tokens=10)
    s.add(eos)
    run_step(s, token=1)
    assert eos.status == RequestStatus.FINISHED_STOPPED
    from server.vocabulary.sampling_params import SamplingParams

    late = request(FULL, [5, 6], max_tokens=10)
    late.params = SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=(9,), temperature=0)
    s.add(late)
    run_step(s, token=9)
    assert late.status == RequestStatus.RUNNING  # min_tokens not reached
    run_step(s, token=9)
    assert late.status == RequestStatus.FINISHED_STOPPED and late.stop_reason == 9


def test_rejects_requests_that_can_never_run():
    s = make(num_blocks=50)
    with pytest.raises(ValueError, match=r"needs .* KV blocks"):
        s.add(request(FULL, list(range(10, 40)), max_tokens=10))
    with pytest.raises(ValueError, match="exceeds the context length 1024"):
        make().add(request(FULL, list(range(1000)), max_tokens=100))


def test_a_request_is_refused_unless_its_longest_step_fits_the_pool():
    """A sliding layer's blocks in a prefill step cover the window behind the chunk's first
    query and the chunk: 8-token blocks, window 32, 32-token chunks. A 41-token prompt's second
    chunk (positions 32..40) sees keys from position 1: blocks 0..5 of each of 16 sliding
    layers, while the 4 full-attention layers hold 6 blocks each (48 tokens at the end):
    96 + 24 = 120 blocks. Counting the window alone (5 blocks per sliding layer: 104) admitted
    it into a pool of 104..119 blocks, where its second chunk could never be booked."""
    prompt = list(range(10, 51))
    with pytest.raises(ValueError, match=r"needs 120 KV blocks"):
        make(num_blocks=119).add(request(FULL, prompt, max_tokens=7))
    s = make(num_blocks=120)
    r = request(FULL, prompt, max_tokens=7)
    s.add(r)
    for _ in range(20):
        if r.is_finished:
            break
        run_step(s)
    assert r.status == RequestStatus.FINISHED_LENGTH and s.blocks.num_free_blocks == 120


def test_preempted_requests_resume_first_and_priority_policy_orders():
    waiting = [
        WaitingRequest("a", 1.0, 5, 10, "full", False),
        WaitingRequest("b", 2.0, 0, 10, "full", False),
        WaitingRequest("c", 3.0, 9, 10, "full", True),
    ]
    assert FirstComeFirstServed().order(waiting) == ["c", "a", "b"]
    assert PriorityOrder().order(waiting) == ["b", "a", "c"]
