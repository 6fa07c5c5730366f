"""Structured output through the serving engine (grammar.py, token_bitmask.py, the sampler's step
1b), on the tiny random-weight dev model: whatever the weights prefer, the output matches its
constraint, greedy and sampled, on any subnet, mixed with unconstrained rows that it leaves
exactly as they were.

The schemas are small and bounded (enums, booleans, a string with maxLength, a bounded integer)
so that every output is complete well within max_tokens: the grammar then allows only eos, and
the request ends with finish_reason "stop". An unbounded schema would be truncated at max_tokens
("length"), as in vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jsonschema
import pytest
import torch

from server.engine import offline
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.offline import GenerationRequest
from server.runtime.grammar import GrammarError, Grammars
from server.runtime.sampler import Sampler
from server.runtime.token_bitmask import allocate_bitmask, allowed_tokens, apply_bitmask_
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.structured_output import StructuredOutput
from tests.runtime.conftest import prompt_ids

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["ok", "color", "name", "count", "tags"],
}
JSON_SCHEMA = StructuredOutput("json_schema", json.dumps(SCHEMA))
# Bounded: 6 characters of at most 6 tokens each (a \uXXXX escape), keys and the rest: < 200.
MAX_TOKENS = 200
REGEX = r"[a-z]{3}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe not"]


def params(structured: StructuredOutput | None, seed: int | None, **fields) -> SamplingParams:
    """Greedy for seed None, else temperature 1 with the seed (full distribution: the least
    likely tokens the mask allows are drawn too)."""
    return SamplingParams(
        max_tokens=fields.pop("max_tokens", MAX_TOKENS),
        temperature=0.0 if seed is None else 1.0,
        seed=seed,
        structured=structured,
        **fields,
    )


def run(rt, requests, **engine_options):
    tokens = sum(len(r.prompt_ids) + r.params.max_tokens + 16 for r in requests)
    engine = assemble_engine(rt, kv_bytes_for(rt, tokens), **engine_options)
    out = offline.generate(engine, requests)
    # Every request's sampler state (and its matcher) is gone once it finished.
    assert engine.runner.states == {}
    return out


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_json_schema_output_parses_and_validates(tiny, seed):
    reqs = [
        GenerationRequest(tiny.subnets[name], prompt_ids(9 + i, seed=i), params(JSON_SCHEMA, seed))
        for i, name in enumerate(["full", "e2b"])
    ]
    for g in run(tiny, reqs):
        assert g.finish_reason == "stop", (g.finish_reason, g.text)
        jsonschema.validate(json.loads(g.text), SCHEMA)


def test_unconstrained_output_would_not_parse(tiny):
    # The test above can fail: without the constraint, the same requests produce no JSON.
    req = GenerationRequest(tiny.subnets["full"], prompt_ids(9), params(None, None, max_tokens=40))
    [g] = run(tiny, [req])
    with pytest.raises(ValueError):
        json.loads(g.text)


def test_json_object_regex_and_choice(tiny):
    reqs = []
    for seed in (None, 7, 8):
        for s in (
            StructuredOutput("json"),
            StructuredOutput("regex", REGEX),
            StructuredOutput("choice", json.dumps(CHOICES)),
        ):
            reqs.append(GenerationRequest(tiny.subnets["e2b"], prompt_ids(12), params(s, seed)))
    out = run(tiny, reqs)
    for i in range(0, len(out), 3):
        obj, rx, choice = out[i : i + 3]
        # "any JSON object" is unbounded, so it may be cut at max_tokens; complete ones parse.
        if obj.finish_reason == "stop":
            assert isinstance(json.loads(obj.text), dict)
        else:
            assert obj.finish_reason == "length" and obj.text.startswith("{")
        assert rx.finish_reason == "stop" and re.fullmatch(REGEX, rx.text), rx.text
        assert choice.finish_reason == "stop" and choice.text in CHOICES, choice.text


@pytest.mark.parametrize(("seeded", "invariant"), [(False, True), (True, True), (False, False)])
def test_mixed_batch_leaves_unconstrained_rows_unchanged(tiny, seeded, invariant):
    # Batch-invariant steps make every row's logits bitwise independent of the batch, so the
    # unconstrained rows' tokens must be identical with and without constrained neighbours:
    # the constraint touches only its own rows. In the default mode other batches change
    # logits only by float32 rounding, which greedy tokens do not see (test_mixed_batch.py).
    free = [
        GenerationRequest(
            tiny.subnets[name], prompt_ids(n, seed=n), params(None, n if seeded else None)
        )
        for name, n in (("full", 11), ("e2b", 17), ("mix-0.75", 23))
    ]
    free = [GenerationRequest(r.subnet, r.prompt_ids, _with(r.params, max_tokens=24)) for r in free]
    constrained = [
        GenerationRequest(tiny.subnets["e2b"], prompt_ids(14, seed=1), params(JSON_SCHEMA, 5)),
        GenerationRequest(
            tiny.subnets["skip-30-33"],
            prompt_ids(8, seed=2),
            params(StructuredOutput("regex", REGEX), None),
        ),
        GenerationRequest(tiny.subnets["full"], prompt_ids(10, seed=3), params(JSON_SCHEMA, None)),
    ]
    alone = run(tiny, free, batch_invariant=invariant)
    mixed = run(
        tiny,
        [free[0], constrained[0], free[1], *constrained[1:], free[2]],
        batch_invariant=invariant,
    )
    together = [mixed[0], mixed[2], mixed[5]]
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids
    for g in (mixed[1], mixed[4]):
        assert g.finish_reason == "stop"
        jsonschema.validate(json.loads(g.text), SCHEMA)
    assert re.fullmatch(REGEX, mixed[3].text)


def _with(p: SamplingParams, **changes) -> SamplingParams:
    return dataclasses.replace(p, **changes)


def test_logprobs_see_only_allowed_tokens(tiny):
    # As in vLLM, the mask comes before logprobs: every alternative with a finite logprob is a
    # token the grammar allows (here: one that starts "red" or "blue"), and the allowed tokens
    # hold all of the probability.
    s = StructuredOutput("choice", json.dumps(["red", "blue"]))
    req = GenerationRequest(tiny.subnets["full"], prompt_ids(9), params(s, 3, logprobs=20))
    [g] = run(tiny, [req])
    assert g.text in ("red", "blue")
    first = g.logprobs[0]
    finite = [(t, lp) for t, lp in first.top if lp != float("-inf")]
    assert finite
    for t, _ in finite:
        piece = tiny.tokenizer.decode([t])
        assert piece and ("red".startswith(piece) or "blue".startswith(piece)), piece
    if len(finite) < len(first.top):  # every allowed token is listed: their mass is all of it
        assert abs(sum(math.exp(lp) for _, lp in finite) - 1) < 1e-4


@pytest.mark.parametrize(
    ("structured", "text", "complete"),
    [
        (StructuredOutput("json"), '{"a":[1,{"b":null}],"c":"d"}', True),
        (StructuredOutput("json"), "{}", True),
        (StructuredOutput("json"), '{"a":1', False),
        (JSON_SCHEMA, '{"ok":true,"color":"red","name":"ab","count":7,"tags":["a"]}', True),
        (StructuredOutput("regex", REGEX), "abc-1", False),
        (StructuredOutput("choice", json.dumps(CHOICES)), "maybe not", True),
    ],
)
def test_matcher_accepts_valid_text_and_allows_eos_only_at_the_end(
    tiny, structured, text, complete
):
    m = tiny.grammars.matcher(structured)
    vocab = tiny.store.text.vocab_size_per_layer_input
    bitmask = allocate_bitmask(1, vocab)
    eos = tiny.tokenizer.stop_ids[0]
    for t in tiny.tokenizer.hf.encode(text, add_special_tokens=False):
        m.fill(bitmask, 0)
        assert allowed_tokens(bitmask, vocab)[0, t], (text, t)
        assert m.accept(t)
    m.fill(bitmask, 0)
    assert bool(allowed_tokens(bitmask, vocab)[0, eos]) == complete
    if complete:
        assert m.accept(eos) and m.terminated


def test_unconstrained_steps_do_no_mask_work(tiny):
    sampler = Sampler(512, (1, 106), grammars=tiny.grammars)
    free = sampler.add_request(params(None, 1))
    logits = torch.randn(1, 512, generator=torch.Generator().manual_seed(0))
    sampler.sample(logits, [free])
    assert "masked" not in sampler._buffers  # no masked copy of the logits was made
    bound = sampler.add_request(params(StructuredOutput("regex", "[ab]+"), 2))
    [_, token] = sampler.sample(torch.cat([logits, logits]), [free, bound])
    assert "masked" in sampler._buffers
    assert tiny.tokenizer.decode([token.token_id]) in ("a", "b")


def test_an_aborted_request_frees_its_matcher(tiny):
    engine = assemble_engine(tiny, kv_bytes_for(tiny, 512))
    engine.add_request("r", prompt_ids(9), tiny.subnets["full"], params(JSON_SCHEMA, 1))
    engine.step()
    assert engine.runner.states["r"].matcher is not None
    engine.abort("r")
    assert engine.runner.states == {}


def test_ignore_eos_keeps_to_stop_tokens_after_the_grammar_ends(tiny):
    # A complete output allows only stop tokens; with ignore_eos the request runs on to
    # max_tokens, generating stop tokens only (no text past the grammar's output).
    s = StructuredOutput("choice", json.dumps(CHOICES))
    req = GenerationRequest(
        tiny.subnets["full"], prompt_ids(9), params(s, 4, ignore_eos=True, max_tokens=12)
    )
    [g] = run(tiny, [req])
    assert g.finish_reason == "length" and len(g.token_ids) == 12
    assert g.text in CHOICES
    stops = set(tiny.tokenizer.stop_ids)
    first_stop = next(i for i, t in enumerate(g.token_ids) if t in stops)
    assert tiny.tokenizer.decode(g.token_ids[:first_stop]) == g.text
    assert set(g.token_ids[first_stop:]) <= stops


def test_a_constraint_that_does_not_compile_leaves_the_engine_as_it_was(tiny):
    # The API compiles first and answers 400; a caller that skips that gets the error at
    # add_request, and nothing of the request stays behind.
    engine = assemble_engine(tiny, kv_bytes_for(tiny, 512))
    bad = params(StructuredOutput("regex", "(("), None)
    with pytest.raises(GrammarError):
        engine.add_request("bad", prompt_ids(9), tiny.subnets["full"], bad)
    assert not engine.has_work and engine.runner.states == {}


def test_grammar_cache_compiles_each_constraint_once(tiny):
    g = Grammars(tiny.tokenizer.hf, tiny.store.text.vocab_size_per_layer_input, (1, 106), 2)
    a, b, c = (StructuredOutput("regex", p) for p in ("a+", "b+", "c+"))
    g.compile(a)
    g.compile(a)
    assert g.compilations == 1
    g.compile(b)
    g.compile(c)  # evicts a (least recently used)
    assert g.compilations == 3 and not g.cached(a) and g.cached(b) and g.cached(c)
    g.compile(a)
    assert g.compilations == 4


@pytest.mark.parametrize(
    "bad",
    [
        StructuredOutput("json_schema", '{"type": 5}'),
        StructuredOutput("json_schema", "{not json"),
        StructuredOutput("regex", "(("),
        StructuredOutput("grammar", "root ::= undefined_rule"),
    ],
)
def test_bad_constraints_do_not_compile(tiny, bad):
    with pytest.raises(GrammarError) as e:
        tiny.grammars.compile(bad)
    assert str(e.value) and "/project/" not in str(e.value)


def test_sampler_without_grammars_refuses_constraints():
    with pytest.raises(ValueError, match="structured"):
        Sampler(512).add_request(params(JSON_SCHEMA, None))


@pytest.mark.parametrize("rows", [[0, 1, 2], [1, 2], [2]])
def test_apply_bitmask_matches_a_plain_loop(rows):
    g = torch.Generator().manual_seed(0)
    V = 300  # not a multiple of 32: the last word is partly past the vocabulary
    logits = torch.randn(3, V, generator=g)
    bitmask = allocate_bitmask(3, V)
    bitmask[1] = torch.randint(-(2**31), 2**31 - 1, (bitmask.shape[1],), generator=g).int()
    bitmask[2] = 0
    bitmask[2, 0] = 0b101  # tokens 0 and 2
    out = logits.clone()
    apply_bitmask_(out, rows, bitmask[rows])
    for r in range(3):
        for t in range(V):
            allowed = r not in rows or (int(bitmask[r, t // 32]) >> (t % 32)) & 1
            assert out[r, t] == (logits[r, t] if allowed else float("-inf")), (r, t)
    assert allowed_tokens(bitmask, V)[2].nonzero()[:, 0].tolist() == [0, 2]
