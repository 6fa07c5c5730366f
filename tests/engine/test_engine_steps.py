"""The Engine over a fake runner: continuous batching of mixed subnets, chunked prefill within the
token budget, prefix caching, stop rules, logprobs, offline generation and latencies.

What these prove, beyond the scheduler's own tests (tests/unit/test_scheduler.py): the whole
step (schedule -> runner -> update -> outputs) hands every request exactly its own tokens,
positions and KV blocks whatever it is batched with (the fake runner computes each token from
what the blocks hold, and checks every contract), so each request's tokens equal its run alone;
and what the caller sees (deltas, text, finish reasons, latencies) matches what happened.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.engine.offline import GenerationRequest, generate
from server.engine.outputs import TokenLogprob
from server.vocabulary.sampling_params import SamplingParams
from tests.engine.fake_runner import EOS, counting_token
from tests.engine.harness import (
    FULL,
    LITE,
    MID,
    MID_LITE,
    SMALL,
    build,
    greedy,
    prompt,
)

SUBNETS = [FULL, LITE, MID, MID_LITE, SMALL]


def test_mixed_subnets_batch_continuously_and_each_request_gets_its_tokens_alone():
    """Twenty requests on five subnets, arriving over time with prompts longer than a chunk:
    the steps mix subnets (and prefills with decodes), and every request's tokens are those of
    the fake model run alone on its subnet. Every block comes back."""
    h = build(max_num_seqs=6)
    plan = [
        (f"r{i}", SUBNETS[i % 5], prompt(5 + 3 * i, seed=i), greedy(4 + i % 7)) for i in range(20)
    ]

    def arrive(step):
        for rid, sn, p, params in plan[2 * step : 2 * step + 2]:
            h.add(rid, p, sn, params)

    h.run(before_step=arrive)
    for rid, sn, _, params in plan:
        assert h.tokens(rid) == h.expected(rid, sn, params), rid
        assert h.final(rid).finish_reason == "length" and h.final(rid).subnet == sn.name
    mixes = [{r.subnet for r in step} for step in h.runner.steps]
    assert max(len(m) for m in mixes) >= 3, "the batches never mixed subnets"
    assert any(
        any(r.num_tokens > 1 for r in step) and any(r.num_tokens == 1 for r in step)
        for step in h.runner.steps
    ), "no step mixed a prefill chunk with decodes"
    h.assert_idle()


def test_a_request_gives_the_same_tokens_alone_in_an_engine_and_batched():
    """The engine-level 'alone' (offline.generate of one request on a fresh engine) equals the
    same request batched with others, for every subnet."""
    batch = [GenerationRequest(sn, prompt(9, seed=i), greedy(6)) for i, sn in enumerate(SUBNETS)]
    together = generate(build().engine, batch)
    for req, got in zip(batch, together, strict=True):
        alone = generate(build().engine, [req])[0]
        assert got.token_ids == alone.token_ids and len(got.token_ids) == 6
        assert got.finish_reason == "length" and got.subnet == req.subnet.name


def test_chunked_prefill_stays_within_the_budget_and_decodes_go_on():
    """A long prompt is computed in chunks of at most max_prefill_chunk; no step exceeds the
    token budget or the sequence limit; running decodes are in every step while it prefills."""
    h = build(max_num_batched_tokens=24, max_prefill_chunk=10, max_num_seqs=4)
    for i in range(3):
        h.add(f"d{i}", prompt(3, seed=i), MID, greedy(30))
    h.step()  # the three short prompts
    h.add("long", prompt(57, seed=9), FULL, greedy(3))
    h.run()
    chunks = []
    for step in h.runner.steps:
        assert sum(r.num_tokens for r in step) <= 24 and len(step) <= 4
        by_id = {r.request_id: r for r in step}
        if "long" in by_id and by_id["long"].start < 57:
            chunks.append((by_id["long"].start, by_id["long"].num_tokens))
            assert all(f"d{i}" in by_id and by_id[f"d{i}"].num_tokens == 1 for i in range(3))
    # 24 tokens a step, 3 of them decodes: the prompt goes 10 at a time (the chunk cap)
    assert chunks == [(0, 10), (10, 10), (20, 10), (30, 10), (40, 10), (50, 7)]
    assert h.tokens("long") == h.expected("long", FULL, greedy(3))
    h.assert_idle()


def test_a_scoring_request_is_chunked_by_its_logits_not_the_token_budget():
    """A request with prompt_logprobs keeps every prompt row's logits (a whole vocabulary
    each), so its chunks stop at max_scored_rows; a plain request beside it still takes the
    prefill chunk."""
    h = build(max_num_batched_tokens=64, max_prefill_chunk=32, max_scored_rows=8)
    h.add("scored", prompt(30, seed=1), FULL, replace(greedy(2), prompt_logprobs=0))
    h.add("plain", prompt(30, seed=2), FULL, greedy(2))
    h.run()
    chunks: dict[str, list[tuple[int, int]]] = {"scored": [], "plain": []}
    for step in h.runner.steps:
        for r in step:
            if r.start < 30:
                chunks[r.request_id].append((r.start, r.num_tokens))
    assert chunks == {"scored": [(0, 8), (8, 8), (16, 8), (24, 6)], "plain": [(0, 30)]}
    assert h.tokens("scored") == h.expected("scored", FULL, greedy(2))
    h.assert_idle()


def test_max_num_seqs_queues_the_rest_in_arrival_order():
    """With room for two sequences, the others wait and are admitted as running ones finish,
    first come first served."""
    h = build(max_num_seqs=2)
    for i in range(5):
        h.add(f"r{i}", prompt(4, seed=i), FULL, greedy(3 + i))
    h.run()
    assert max(len(s) for s in h.runner.steps) == 2
    first_step = {}
    for n, step in enumerate(h.runner.steps):
        for r in step:
            first_step.setdefault(r.request_id, n)
    assert sorted(first_step, key=first_step.get) == [f"r{i}" for i in range(5)]
    h.assert_idle()


def test_prefix_cache_shares_blocks_within_a_kv_layout_only_and_changes_no_token():
    """A prompt computed on `full` is served from the cache to a later request on `lite` (same KV
    layout), not to one on `mid`; the shared blocks hold the right KV (the fake runner reads
    them) and the tokens are the run-alone ones."""
    h = build(block_size=4)
    shared = prompt(26, seed=3)
    h.add("first", shared, FULL)
    h.run()
    h.add("same-kv", shared, LITE)
    h.add("other-kv", shared, MID)
    h.run()
    assert h.final("same-kv").num_cached_tokens == 24  # six full blocks; the rest is computed
    assert h.final("other-kv").num_cached_tokens == 0
    first_start = {}
    for step in h.runner.steps:
        for r in step:
            first_start.setdefault(r.request_id, r.start)
    assert (first_start["same-kv"], first_start["other-kv"]) == (24, 0)
    for rid, sn in (("first", FULL), ("same-kv", LITE), ("other-kv", MID)):
        assert h.tokens(rid) == h.expected(rid, sn)
    h.assert_idle()


def test_a_subnet_that_skips_kv_layers_books_fewer_blocks():
    """`small` skips two KV-owning layers: it books 18 layers' blocks where `full` books 20
    (8 positions: two blocks of 4 per layer)."""
    h = build(block_size=4)
    h.add("small", prompt(8), SMALL)
    h.add("full", prompt(8), FULL)
    h.step()
    assert h.blocks.num_held("small") == 18 * 2 and h.blocks.num_held("full") == 20 * 2
    h.run()
    h.assert_idle()


def test_sliding_layers_keep_only_their_window_over_a_long_sequence():
    """Past the sliding window (32 positions), sliding layers give blocks back; the fake runner
    still finds every position each layer attends to, and the tokens are unchanged."""
    h = build(block_size=4, max_model_len=256)
    h.add("long", prompt(60), FULL, greedy(40))
    full_layers = sum(1 for layer in FULL.kv_layers if layer not in h.blocks.layout.sliding_layers)
    peak = 0
    while h.engine.has_work:
        h.step()
        peak = max(peak, h.blocks.num_held("long"))
    assert h.tokens("long") == h.expected("long", FULL, greedy(40))
    # 100 positions = 25 blocks on full layers; sliding layers at most 32/4 + 1 (+1 in a step)
    sliding = len(FULL.kv_layers) - full_layers
    assert peak <= full_layers * 25 + sliding * 10 < len(FULL.kv_layers) * 25
    h.assert_idle()


# ---- stop rules -----------------------------------------------------------------------------


def counting_engine(**kw):
    return build(next_token=counting_token, **kw)


A = ord("a")


def test_max_tokens_ends_with_length():
    h = counting_engine()
    h.add("r", [A], FULL, greedy(3))
    h.run()
    assert h.tokens("r") == [ord(c) for c in "bcd"] and h.text("r") == "bcd"
    assert h.final("r").finish_reason == "length" and h.final("r").num_output_tokens == 3
    h.assert_idle()


def test_stop_token_ends_with_stop_and_names_it_and_min_tokens_holds_it_back():
    """A stop token id ends the request ("stop", stop_reason the id); before min_tokens it does
    not (the sampler would mask it; the engine must not stop on it either)."""
    h = counting_engine()
    h.add("stop", [A], FULL, greedy(10, stop_token_ids=(ord("c"),)))
    # counting wraps at 126: the stop id comes again after 95 tokens; min_tokens skips the first
    h.add("min", [A], FULL, greedy(100, stop_token_ids=(ord("c"),), min_tokens=3))
    h.run()
    assert h.tokens("stop") == [ord("b"), ord("c")]
    assert (h.final("stop").finish_reason, h.final("stop").stop_reason) == ("stop", ord("c"))
    assert len(h.tokens("min")) == 97 and h.tokens("min")[-1] == ord("c")
    assert h.final("min").finish_reason == "stop"
    h.assert_idle()


def test_eos_stops_unless_ignore_eos_and_never_shows_in_the_text():
    """eos ends a request with "stop" (no stop_reason) unless ignore_eos; it decodes to nothing."""

    def eos_at_4(subnet, ctx):
        return EOS if len(ctx) == 4 else counting_token(subnet, ctx)

    h = build(next_token=eos_at_4)
    h.add("eos", [A], FULL, SamplingParams(max_tokens=10, temperature=0.0))
    h.add("ignore", [A], FULL, greedy(5))
    h.run()
    assert h.tokens("eos") == [ord("b"), ord("c"), ord("d"), EOS] and h.text("eos") == "bcd"
    assert (h.final("eos").finish_reason, h.final("eos").stop_reason) == ("stop", None)
    assert len(h.tokens("ignore")) == 5 and h.final("ignore").finish_reason == "length"
    h.assert_idle()


def test_stop_strings_cut_the_text_and_end_the_request():
    """A stop string ends the request as soon as its text appears, cut from the text (or kept
    with include_stop_str_in_output), even across tokens; the tokens are all still reported."""
    h = counting_engine()
    h.add("cut", [A], FULL, greedy(10, stop=("de",)))
    h.add("keep", [A], FULL, greedy(10, stop=("de",), include_stop_str_in_output=True))
    h.run()
    assert h.text("cut") == "bc" and h.text("keep") == "bcde"
    assert h.tokens("cut") == [ord(c) for c in "bcde"]
    for rid in ("cut", "keep"):
        assert (h.final(rid).finish_reason, h.final(rid).stop_reason) == ("stop", "de")
    h.assert_idle()


def test_a_stop_string_completed_by_the_last_allowed_token_ends_with_stop():
    """When the max_tokens-th token completes a stop string, the text is cut at it, so the
    request ended because of the stop string: "stop" with the string, not "length"."""
    h = counting_engine()
    h.add("r", [A], FULL, greedy(3, stop=("cd",)))
    h.run()
    assert h.text("r") == "b" and len(h.tokens("r")) == 3
    assert (h.final("r").finish_reason, h.final("r").stop_reason) == ("stop", "cd")
    h.assert_idle()


def test_min_tokens_holds_back_stop_strings_as_it_does_stop_tokens():
    """Before min_tokens tokens, a stop string does not end the request (as vLLM: min_tokens
    counts before any stop condition); from then on it does."""
    h = counting_engine()
    h.add("r", [A], FULL, greedy(20, stop=("c",), min_tokens=5))
    h.add("at", [A], FULL, greedy(20, stop=("f",), min_tokens=5))  # "f" is the 5th token
    h.run()
    # b c d e f ... the first "c" is token 2: ignored; the next is 95 tokens later: past max
    assert h.text("r") == "".join(chr(t) for t in h.tokens("r"))
    assert len(h.tokens("r")) == 20 and h.final("r").finish_reason == "length"
    assert h.text("at") == "bcde" and h.final("at").stop_reason == "f"
    h.assert_idle()


def test_text_is_streamed_in_whole_characters_and_joins_to_the_decoded_output():
    """Deltas never split a UTF-8 character: a model writing 'é' as two byte tokens, then 'x',
    streams nothing until a token with text of its own ends the byte run, and the concatenated
    text is decode(all tokens)."""
    cycle = [*"é".encode(), ord("x")]

    def utf8(subnet, ctx):
        return cycle[(len(ctx) - 1) % 3]

    h = build(next_token=utf8)
    h.add("r", [A], FULL, greedy(6))
    h.run()
    texts = [o.text for o in h.outputs["r"]]
    assert texts == ["", "", "éx", "", "", "éx"] and h.text("r") == "éxéx"


def test_logprobs_are_passed_through_for_requests_that_ask():
    """A request with logprobs=k gets one TokenLogprob per token (the runner's values); one
    without gets None."""
    h = counting_engine()
    h.add("lp", [A], FULL, greedy(2, logprobs=2))
    h.add("none", [A], FULL, greedy(2))
    h.run()
    lps = [lp for o in h.outputs["lp"] for lp in o.logprobs]
    b = ord("b")
    assert lps[0] == TokenLogprob(b, -0.25, ((b, -0.5), (b + 1, -1.0)))
    assert len(lps) == 2 and all(o.logprobs is None for o in h.outputs["none"])


def test_offline_generate_collects_text_logits_and_refuses_a_busy_engine():
    """offline.generate runs requests to completion through the engine, in request order, with
    kept logits rows (opaque to the engine) one per token; it refuses an engine with work."""
    h = counting_engine()
    reqs = [GenerationRequest(FULL, [A], greedy(3)), GenerationRequest(MID, [ord("x")], greedy(2))]
    got = generate(h.engine, reqs, keep_logits=True)
    assert [g.text for g in got] == ["bcd", "yz"] and [g.subnet for g in got] == ["full", "mid"]
    assert [len(g.logits) for g in got] == [3, 2] and got[0].logits[0][0] == "logits"
    h.add("busy", [A])
    with pytest.raises(RuntimeError, match="idle"):
        generate(h.engine, reqs)


def test_requests_that_can_never_run_are_refused_at_once_and_leave_nothing():
    """Empty prompt, no subnet without a policy, bad parameters, too long for the context or the
    KV pool, a duplicate id: ValueError at add, nothing queued or registered."""
    h = build(num_blocks=200, max_model_len=64)
    h.add("dup", [A])
    bad = [
        ([], FULL, greedy()),
        ([A], None, greedy()),
        ([A], FULL, SamplingParams(max_tokens=0)),
        ([A] * 60, FULL, greedy(10)),  # 70 > max_model_len
        ([A] * 40, FULL, greedy(20)),  # 60 positions x 20 layers > 200 blocks
    ]
    for p, sn, params in bad:
        with pytest.raises(ValueError):
            h.engine.add_request("bad", p, sn, params)
    with pytest.raises(ValueError, match="in use"):
        h.engine.add_request("dup", [A], FULL, greedy())
    assert set(h.scheduler.requests) == {"dup"} and set(h.runner.live) == {"dup"}


# ---- latencies ------------------------------------------------------------------------------

# The fake clock is a float sum of 0.01 steps: a few ulps off the decimal value, never 1e-9.
EXACT = 1e-9


def test_latencies_on_the_final_output_follow_the_steps(clock):
    """With one sequence at a time and 10 ms steps: the first request is scheduled at once
    (queue 0), its first token comes after its prefill step (ttft 10 ms), then one per step
    (tpot 10 ms); the second queues for the first's five steps, and ttft includes the queue."""
    h = build(max_num_seqs=1, clock=clock, step_seconds=0.01)
    h.add("a", prompt(10), FULL, greedy(5))
    h.add("b", prompt(10, 1), FULL, greedy(3))
    h.run()
    a, b = h.final("a").latency, h.final("b").latency
    assert a.queue_s == pytest.approx(0.0, abs=EXACT)
    assert a.ttft_s == pytest.approx(0.01, abs=EXACT)
    assert a.tpot_s == pytest.approx(0.01, abs=EXACT)
    assert a.e2e_s == pytest.approx(0.05, abs=EXACT)
    assert b.queue_s == pytest.approx(0.05, abs=EXACT)
    assert b.ttft_s == pytest.approx(0.06, abs=EXACT)
    assert b.tpot_s == pytest.approx(0.01, abs=EXACT)
    assert b.e2e_s == pytest.approx(0.08, abs=EXACT)
    assert all(o.latency is None for o in h.outputs["a"][:-1])


def test_latency_of_a_chunked_prefill_counts_every_chunk_and_one_token_has_no_tpot(clock):
    """A 40-token prompt in 16-token chunks takes three steps to its first token; a request
    with one token has no time per output token; one aborted before it ran has no queue time."""
    h = build(clock=clock, max_prefill_chunk=16, max_num_batched_tokens=16, max_num_seqs=1)
    h.add("long", prompt(40), FULL, greedy(1))
    h.add("never", prompt(4), FULL, greedy(1))
    h.step()
    clock.advance(1.0)
    never = h.engine.abort("never")
    h.run()
    lat = h.final("long").latency
    assert lat.ttft_s == pytest.approx(1.03, abs=EXACT) and lat.tpot_s is None
    assert never.latency.queue_s is None and never.latency.ttft_s is None
    assert never.latency.e2e_s == pytest.approx(1.01, abs=EXACT)
