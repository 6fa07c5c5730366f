"""SamplingParams: defaults, normalisation, and every validation rule with its param and message.

Plain Python: the module must not import torch (the API imports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.vocabulary.sampling_params import SamplingParams, SamplingParamsError
from server.vocabulary.structured_output import StructuredOutput

REPO = Path(__file__).resolve().parents[2]
VOCAB = 1000


def test_defaults_are_valid_and_sampling() -> None:
    p = SamplingParams()
    p.validate(VOCAB)
    p.validate(VOCAB, max_model_len=16)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.logprobs) == (16, 1.0, 1.0, 0, None)
    assert not p.greedy


def test_greedy_is_temperature_zero() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-6).greedy


def test_lists_and_dicts_become_tuples_and_stay_hashable() -> None:
    p = SamplingParams(logit_bias={5: 1.0, 3: -2.0}, stop=["a", "b"], stop_token_ids=[1, 2])
    assert p.logit_bias == ((5, 1.0), (3, -2.0))
    assert p.stop == ("a", "b") and p.stop_token_ids == (1, 2)
    q = SamplingParams(logit_bias=[[5, 1.0], [3, -2.0]], stop=("a", "b"), stop_token_ids=(1, 2))
    assert p == q and hash(p) == hash(q)
    p.validate(VOCAB)


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().top_p = 0.5  # type: ignore[misc]


def test_boundary_values_are_accepted() -> None:
    SamplingParams(
        max_tokens=1,
        min_tokens=1,
        temperature=0,
        top_p=1e-9,
        top_k=1,
        min_p=1,
        seed=-(2**63),
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=1e-3,
        logit_bias=((0, -100), (VOCAB - 1, 100)),
        stop=tuple(f"s{i}" for i in range(16)),
        stop_token_ids=(0, VOCAB - 1),
        ignore_eos=True,
        include_stop_str_in_output=True,
        logprobs=20,
    ).validate(VOCAB, max_model_len=1)
    SamplingParams(seed=2**64 - 1, min_p=0, presence_penalty=2, logprobs=0).validate(VOCAB)
    SamplingParams(temperature=5, top_k=VOCAB * 2, repetition_penalty=100).validate(VOCAB)


NAN, INF = float("nan"), float("inf")

# (fields, offending param, a fragment of the message)
BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be an int >= 1, got 0"),
    ({"max_tokens": -3}, "max_tokens", "max_tokens must be an int >= 1"),
    ({"max_tokens": 2.0}, "max_tokens", "max_tokens must be an int >= 1, got 2.0"),
    ({"max_tokens": True}, "max_tokens", "max_tokens must be an int >= 1, got True"),
    ({"max_tokens": None}, "max_tokens", "max_tokens must be an int"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens must be an int >= 0, got -1"),
    ({"min_tokens": 17}, "min_tokens", "min_tokens must be at most max_tokens (16), got 17"),
    ({"min_tokens": 1.5}, "min_tokens", "min_tokens must be an int >= 0"),
    ({"temperature": -0.1}, "temperature", "temperature must be >= 0 (0 means greedy)"),
    ({"temperature": NAN}, "temperature", "temperature must be a finite number, got nan"),
    ({"temperature": INF}, "temperature", "temperature must be a finite number"),
    ({"temperature": "1"}, "temperature", "temperature must be a finite number, got '1'"),
    ({"temperature": False}, "temperature", "temperature must be a finite number"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0"),
    ({"top_p": 1.01}, "top_p", "top_p must be in (0, 1], got 1.01"),
    ({"top_p": -0.5}, "top_p", "top_p must be in (0, 1]"),
    ({"top_p": NAN}, "top_p", "top_p must be a finite number"),
    ({"top_k": -1}, "top_k", "top_k must be 0 (off) or >= 1, got -1"),
    ({"top_k": 2.5}, "top_k", "top_k must be 0 (off) or >= 1, got 2.5"),
    ({"min_p": -0.01}, "min_p", "min_p must be in [0, 1], got -0.01"),
    ({"min_p": 1.5}, "min_p", "min_p must be in [0, 1]"),
    ({"min_p": None}, "min_p", "min_p must be a finite number"),
    ({"seed": 2**64}, "seed", "seed must be null or an int in [-2**63, 2**64)"),
    ({"seed": -(2**63) - 1}, "seed", "seed must be null or an int in [-2**63, 2**64)"),
    ({"seed": 1.0}, "seed", "seed must be null or an int"),
    ({"seed": True}, "seed", "seed must be null or an int"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be in [-2, 2]"),
    ({"presence_penalty": -2.01}, "presence_penalty", "presence_penalty must be in [-2, 2]"),
    ({"presence_penalty": NAN}, "presence_penalty", "presence_penalty must be a finite number"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
    ({"frequency_penalty": INF}, "frequency_penalty", "frequency_penalty must be a finite"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0"),
    ({"repetition_penalty": -1}, "repetition_penalty", "(1 means off), got -1"),
    ({"repetition_penalty": INF}, "repetition_penalty", "must be a finite number"),
    ({"logit_bias": {VOCAB: 1.0}}, "logit_bias", "token ids must be ints in [0, 1000), got 1000"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias", "token ids must be ints in [0, 1000), got -1"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", "token ids must be ints in [0, 1000), got '5'"),
    ({"logit_bias": {5: 100.5}}, "logit_bias", "for token id 5 must be a number in [-100, 100]"),
    ({"logit_bias": {5: -101}}, "logit_bias", "must be a number in [-100, 100], got -101"),
    ({"logit_bias": {5: NAN}}, "logit_bias", "must be a number in [-100, 100], got nan"),
    ({"logit_bias": ((5, 1.0), (5, 2.0))}, "logit_bias", "logit_bias names token id 5 twice"),
    ({"logit_bias": ((5, 1.0, 2),)}, "logit_bias", "entries must be (token id, bias) pairs"),
    ({"logit_bias": 5}, "logit_bias", "logit_bias must map token ids to biases, got 5"),
    ({"stop": ("ok", "")}, "stop", "stop strings must be non-empty strings, got ''"),
    ({"stop": (3,)}, "stop", "stop strings must be non-empty strings, got 3"),
    ({"stop": "abc"}, "stop", "stop must be a list of strings, got 'abc'"),
    ({"stop": tuple("abcdefghijklmnopq")}, "stop", "stop may hold at most 16 strings, got 17"),
    ({"stop": ("x" * 4000, "y" * 97)}, "stop", "may total at most 4096 characters, got 4097"),
    ({"stop": ("a\ud800",)}, "stop", "stop strings must be valid Unicode"),
    ({"stop_token_ids": (1,) * 1025}, "stop_token_ids", "at most 1024 ids, got 1025"),
    ({"logit_bias": tuple((i, 1.0) for i in range(1025))}, "logit_bias", "at most 1024 entries"),
    ({"stop_token_ids": (1, VOCAB)}, "stop_token_ids", "must be ints in [0, 1000), got 1000"),
    ({"stop_token_ids": (-2,)}, "stop_token_ids", "must be ints in [0, 1000), got -2"),
    ({"stop_token_ids": (1.0,)}, "stop_token_ids", "must be ints in [0, 1000), got 1.0"),
    ({"stop_token_ids": 7}, "stop_token_ids", "stop_token_ids must be a list of token ids"),
    ({"ignore_eos": 1}, "ignore_eos", "ignore_eos must be a boolean, got 1"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output", "must be a boolean"),
    ({"logprobs": 21}, "logprobs", "logprobs must be null or an int in [0, 20], got 21"),
    ({"structured": "json"}, "structured", "structured must be a StructuredOutput"),
    (
        {"structured": StructuredOutput("json_schema", "{")},
        "structured",
        "the json_schema constraint is not valid JSON",
    ),
    (
        {"structured": StructuredOutput("json"), "min_tokens": 3, "max_tokens": 8},
        "min_tokens",
        "min_tokens cannot be combined with a structured-output constraint",
    ),
    ({"logprobs": -1}, "logprobs", "logprobs must be null or an int in [0, 20], got -1"),
    ({"logprobs": True}, "logprobs", "logprobs must be null or an int in [0, 20], got True"),
    ({"logprobs": 2.0}, "logprobs", "logprobs must be null or an int in [0, 20]"),
    (
        {"prompt_logprobs": 21},
        "prompt_logprobs",
        "prompt_logprobs must be null or an int in [0, 20], got 21",
    ),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "prompt_logprobs must be null or an int"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD, ids=[b[1] for b in BAD])
def test_each_rule_names_its_param(fields: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**fields).validate(VOCAB)
    assert info.value.param == param
    assert message in str(info.value)
    assert info.value.message == str(info.value)
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_every_field_has_a_rule() -> None:
    tested = {param for _, param, _ in BAD}
    fields = set(SamplingParams.__dataclass_fields__)
    assert fields == tested


def test_max_tokens_bounded_by_context_only_when_given() -> None:
    p = SamplingParams(max_tokens=4096)
    p.validate(VOCAB)
    p.validate(VOCAB, max_model_len=4096)
    with pytest.raises(SamplingParamsError) as info:
        p.validate(VOCAB, max_model_len=4095)
    assert info.value.param == "max_tokens"
    assert "at most the model's context length 4095, got 4096" in str(info.value)


def test_min_tokens_checked_against_max_tokens() -> None:
    SamplingParams(max_tokens=5, min_tokens=5).validate(VOCAB)
    with pytest.raises(SamplingParamsError, match="at most max_tokens \\(5\\), got 6"):
        SamplingParams(max_tokens=5, min_tokens=6).validate(VOCAB)


def test_min_tokens_must_leave_a_token_to_sample() -> None:
    # While min_tokens is unmet the sampler masks eos and stop_token_ids; if they cover the whole
    # vocabulary, every step of the request would fail inside the engine.
    almost = SamplingParams(max_tokens=3, min_tokens=1, stop_token_ids=tuple(range(VOCAB - 1)))
    almost.validate(VOCAB)  # one id left
    almost.validate(VOCAB, eos_token_ids=(0, 5, VOCAB + 3))  # eos already masked, or outside
    with pytest.raises(SamplingParamsError) as info:
        almost.validate(VOCAB, eos_token_ids=(VOCAB - 1,))
    assert info.value.param == "min_tokens" and "whole vocabulary" in str(info.value)
    everything = SamplingParams(max_tokens=3, stop_token_ids=tuple(range(VOCAB)))
    with pytest.raises(SamplingParamsError, match="min_tokens"):
        SamplingParams(**{**everything.__dict__, "min_tokens": 1}).validate(VOCAB)
    with pytest.raises(SamplingParamsError, match="at most 1024"):  # the real vocabularies
        SamplingParams(stop_token_ids=tuple(range(2000))).validate(2000)
    everything.validate(VOCAB)  # without min_tokens nothing is masked


def test_token_ids_checked_against_the_given_vocabulary() -> None:
    p = SamplingParams(logit_bias={1999: 1.0}, stop_token_ids=(1999,))
    p.validate(2000)
    with pytest.raises(SamplingParamsError) as info:
        p.validate(1999)
    assert info.value.param == "logit_bias"


def test_first_failing_field_is_reported() -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(top_p=0, logprobs=99).validate(VOCAB)
    assert info.value.param == "top_p"


@pytest.mark.parametrize("vocab", [0, -1, 2.0, True])
def test_bad_vocab_size_is_a_caller_error(vocab: Any) -> None:
    with pytest.raises(ValueError, match="vocab_size must be a positive int") as info:
        SamplingParams().validate(vocab)
    assert not isinstance(info.value, SamplingParamsError)
