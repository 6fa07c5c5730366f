"""Prompt logprobs (vLLM's prompt_logprobs; echo with logprobs) through the serving engine.

Proves: every prompt token's logprob, rank and top k equal the model's own float64 full forward
over the prompt, for several subnets, when the prompt is prefilled in several chunks that share
their steps with other requests (scoring and not), and when a request is preempted and
recomputed; a scoring request never reads the prefix cache (as vLLM) yet still fills it for
others; scoring changes no generated token, its own or its neighbours'.

Bounds: a logprob is x_t - logsumexp(x), so its error is at most twice the largest error of the
logits row; the logits' float32 error is measured in the same run against float64
(conftest.float32_bound), never a number seen on one machine.
"""

from __future__ import annotations

import pytest
import torch

from server.engine import offline
from server.engine.assembly import assemble_engine
from server.engine.offline import GenerationRequest, greedy
from server.engine.scheduler import SchedulerConfig
from tests.runtime.conftest import float32_bound, prefill_logits, prompt_ids

SUBNETS = ("full", "e2b", "skip-3-7")
MB = 1024 * 1024
PROMPT = 45  # tokens: six chunks of at most 8
TOP = 3


def chunked_engine(rt):
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=24, max_prefill_chunk=8, max_model_len=256
    )
    return assemble_engine(rt, 8 * MB, config, block_size=8)


def reference(rt32, rt64, subnet, ids):
    """(float64 logprobs of each prompt token from position 1, the bound for float32 values)."""
    V = rt64.store.text.vocab_size_per_layer_input
    exact = prefill_logits(rt64, subnet, ids)[:-1, :V]
    measured = prefill_logits(rt32, subnet, ids)[:-1, :V]
    logprobs = torch.log_softmax(exact, dim=-1)
    return logprobs, 2 * float32_bound(measured, exact)


@pytest.fixture(scope="module")
def scored(tiny):
    """Three scoring requests (one per subnet, distinct prompts) and one that only generates,
    in one chunked engine."""
    subnets = {s.name: s for s in tiny.subnets}
    prompts = [prompt_ids(PROMPT, seed=i) for i in range(len(SUBNETS))]
    requests = [
        GenerationRequest(subnets[name], ids, greedy(4, prompt_logprobs=TOP))
        for name, ids in zip(SUBNETS, prompts, strict=True)
    ]
    bystander = GenerationRequest(subnets["e2b"], prompt_ids(30, seed=9), greedy(4))
    eng = chunked_engine(tiny)
    results = offline.generate(eng, [*requests, bystander])
    return requests, bystander, results


def test_prompt_logprobs_equal_the_float64_forward_through_chunks_and_batches(tiny, tiny64, scored):
    requests, _, results = scored
    for req, got in zip(requests, results, strict=False):
        ids = list(req.prompt_ids)
        want, bound = reference(tiny, tiny64, req.subnet, ids)
        lps = got.prompt_logprobs
        assert lps is not None and len(lps) == len(ids)
        assert lps[0] is None  # the first token has no context
        for p in range(1, len(ids)):
            lp, row = lps[p], want[p - 1]
            assert lp.position == p and lp.token_id == ids[p]
            assert abs(lp.logprob - row[ids[p]].item()) <= bound, (req.subnet.name, p)
            # rank: ids at least as likely, up to rounding on either side of the token's value
            t = row[ids[p]].item()
            assert (row > t + bound).sum().item() < lp.rank <= (row >= t - bound).sum().item()
            assert len(lp.top) == TOP
            top_want = torch.topk(row, TOP).values.tolist()
            for (tid, value), w in zip(lp.top, top_want, strict=True):
                assert abs(value - w) <= bound  # the k highest values...
                assert abs(value - row[tid].item()) <= bound  # ...held by the ids named
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_scoring_changes_no_generated_token(tiny, scored):
    requests, bystander, results = scored
    for req, got in zip([*requests, bystander], results, strict=True):
        plain = GenerationRequest(req.subnet, req.prompt_ids, greedy(4))
        [alone] = offline.generate(chunked_engine(tiny), [plain])
        assert got.token_ids == alone.token_ids, req.subnet.name
    assert results[-1].prompt_logprobs is None  # only those that asked


def test_a_scoring_request_bypasses_the_prefix_cache_but_fills_it(tiny, tiny64):
    subnet = next(s for s in tiny.subnets if s.name == "e2b")
    ids = prompt_ids(PROMPT, seed=21)
    eng = chunked_engine(tiny)

    def serve(rid, **fields):
        eng.add_request(rid, ids, subnet, greedy(2, **fields))
        outs = []
        while eng.has_work:
            outs += [o for o in eng.step() if o.request_id == rid]
        return outs

    serve("warm")  # fills the prefix cache with this prompt
    outs = serve("scoring", prompt_logprobs=0)
    assert outs[-1].num_cached_tokens == 0  # computed every position: nothing skipped
    scored = next(o.prompt_logprobs for o in outs if o.prompt_logprobs is not None)
    want, bound = reference(tiny, tiny64, subnet, ids)
    for p in range(1, len(ids)):
        assert abs(scored[p].logprob - want[p - 1, ids[p]].item()) <= bound
        assert scored[p].top == ()
    assert serve("after")[-1].num_cached_tokens > 0  # the cache still serves others


def test_prompt_logprobs_survive_a_preemption(tiny, tiny64):
    """A KV pool too small for both requests: one is preempted and recomputed; its prompt
    scores are still the forward's (a recomputed chunk overwrites them alike)."""
    from server.engine.assembly import kv_bytes_for

    subnet = next(s for s in tiny.subnets if s.name == "full")
    prompts = [prompt_ids(PROMPT, seed=31), prompt_ids(PROMPT, seed=32)]
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=24, max_prefill_chunk=8, max_model_len=256
    )
    eng = assemble_engine(tiny, kv_bytes_for(tiny, PROMPT + 16), config, block_size=8)
    requests = [GenerationRequest(subnet, ids, greedy(24, prompt_logprobs=1)) for ids in prompts]
    results = offline.generate(eng, requests)
    assert eng.scheduler.num_preemptions > 0  # the case this test is about happened
    for ids, got in zip(prompts, results, strict=True):
        want, bound = reference(tiny, tiny64, subnet, ids)
        assert got.prompt_logprobs is not None and got.prompt_logprobs[0] is None
        for p in range(1, len(ids)):
            assert abs(got.prompt_logprobs[p].logprob - want[p - 1, ids[p]].item()) <= bound
