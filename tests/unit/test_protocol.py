"""The OpenAI wire types (server/api/protocol.py) on their own: what is accepted, what is
ignored, what is refused and under which parameter name.

Proves: `null` for an optional field is its default (and a field that takes null keeps its
meaning); fields that change nothing are accepted; unknown fields and non-text modalities are
refused by name; echo, max_tokens 0 and prompt_logprobs follow vLLM's rules.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizePromptRequest,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def refused(model, body) -> str:
    """The parameter the first validation error names."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return ".".join(str(p) for p in info.value.errors()[0]["loc"])


def test_null_is_the_default() -> None:
    chat = ChatCompletionRequest.model_validate(
        {**CHAT, "n": None, "stream": None, "logprobs": None, "top_logprobs": None}
    )
    assert (chat.n, chat.stream, chat.logprobs, chat.top_logprobs) == (1, False, False, None)
    done = CompletionRequest.model_validate(
        {**COMPLETION, "n": None, "echo": None, "stream": None, "logprobs": None}
    )
    assert (done.n, done.echo, done.stream, done.logprobs) == (1, False, False, None)
    assert CompletionRequest.model_validate(COMPLETION).max_tokens == 16
    # a null max_tokens keeps its meaning (up to the context, as vLLM), not 16
    assert CompletionRequest.model_validate({**COMPLETION, "max_tokens": None}).max_tokens is None
    # required fields stay required
    assert refused(CompletionRequest, {**COMPLETION, "prompt": None}).startswith("prompt")
    assert refused(ChatCompletionRequest, {**CHAT, "model": None}) == "model"


def test_fields_that_change_nothing_are_accepted() -> None:
    ChatCompletionRequest.model_validate(
        {
            **CHAT,
            "store": True,
            "metadata": {"k": "v"},
            "service_tier": "auto",
            "user": "u",
            "reasoning_effort": "low",
            "modalities": ["text"],
            "prediction": {"type": "content", "content": "hello"},
            "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False},
        }
    )
    CompletionRequest.model_validate({**COMPLETION, "store": False, "metadata": None})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"tools_unknown": []}, "tools_unknown"),
        ({"stream_options": {"include_usage": True, "other": 1}}, "stream_options.other"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"n": "2"}, "n"),  # strict: no coercion, null or not
    ],
)
def test_refused_by_name(body: dict, param: str) -> None:
    assert refused(ChatCompletionRequest, {**CHAT, **body}) == param


def test_echo_max_tokens_0_and_prompt_logprobs_follow_vllm() -> None:
    scoring = CompletionRequest.model_validate({**COMPLETION, "echo": True, "max_tokens": 0})
    assert scoring.score_only and scoring.output_limit == 1 and scoring.conflict() is None
    bare = CompletionRequest.model_validate({**COMPLETION, "max_tokens": 0})
    assert bare.conflict() is not None and bare.conflict()[0] == "max_tokens"
    streamed = CompletionRequest.model_validate(
        {**COMPLETION, "prompt_logprobs": 1, "stream": True}
    )
    assert streamed.conflict()[0] == "prompt_logprobs"
    chat = ChatCompletionRequest.model_validate({**CHAT, "prompt_logprobs": 0, "stream": True})
    assert chat.conflict()[0] == "prompt_logprobs"
    assert CompletionRequest.model_validate({**COMPLETION, "echo": True, "n": 3}).n == 3
    assert refused(CompletionRequest, {**COMPLETION, "max_tokens": -1}) == "max_tokens"


def test_tokenize_shapes() -> None:
    assert TokenizePromptRequest.model_validate({"prompt": "x"}).add_special_tokens
    chat = TokenizeChatRequest.model_validate({"messages": CHAT["messages"]})
    assert chat.add_generation_prompt and not chat.add_special_tokens
    assert DetokenizeRequest.model_validate({"tokens": [1, 2]}).tokens == [1, 2]
    assert refused(DetokenizeRequest, {"tokens": ["a"]}).startswith("tokens")


def test_a_whole_number_is_an_integer_and_nothing_else_is() -> None:
    # JSON Schema's "integer" (what /openapi.json says) admits 2.0; clients and fuzzers send it.
    chat = ChatCompletionRequest.model_validate(
        {**CHAT, "n": 2.0, "max_tokens": 5.0, "seed": -3.0, "stop_token_ids": [1.0, 7]}
    )
    assert (chat.n, chat.max_tokens, chat.seed, chat.stop_token_ids) == (2, 5, -3, [1, 7])
    assert type(chat.n) is int and all(type(t) is int for t in chat.stop_token_ids)
    assert DetokenizeRequest.model_validate({"tokens": [3.0]}).tokens == [3]
    for bad in (2.5, "2", True):
        assert refused(ChatCompletionRequest, {**CHAT, "n": bad}) == "n"
    assert refused(CompletionRequest, {**COMPLETION, "logprobs": 1.5}) == "logprobs"
