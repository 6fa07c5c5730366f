"""Structured output against a live server, through real clients: the official `openai` client
(response_format json_schema, streamed and not; `chat.completions.parse` with a pydantic model;
vLLM's guided_* extras through `extra_body`), LangChain's `with_structured_output` (json_schema
and json_mode, streamed and not) and LiteLLM's `completion(response_format=...)` (streamed and
not); and the 400s for a constraint
that cannot be compiled or for two at once.

The model has random weights, so only the constraint makes its output JSON at all. The schemas
are small and bounded (enums, booleans, short strings, bounded integers), so every output ends
well within max_tokens with finish_reason "stop" (the grammar then allows only eos).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.api.live import MODEL, LiveServer, error_of

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "fish"]},
        "indoor": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
    },
    "required": ["kind", "indoor", "name", "age"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True},
}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
MAX_TOKENS = 200  # the schema's longest output is far shorter (six \uXXXX escapes at most)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    indoor: bool
    name: Annotated[str, Field(max_length=6)]
    age: Annotated[int, Field(ge=0, le=30)]


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_json_schema_response_validates(server: LiveServer, seed: int | None) -> None:
    r = server.openai().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format=RESPONSE_FORMAT,
        max_tokens=MAX_TOKENS,
        temperature=0 if seed is None else 1.0,
        seed=seed,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_json_schema_response_validates(server: LiveServer) -> None:
    stream = server.openai().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format=RESPONSE_FORMAT,
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=5,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_parse_returns_the_pydantic_object(server: LiveServer) -> None:
    r = server.openai().chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Pet, max_tokens=MAX_TOKENS, seed=3
    )
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet)
    assert pet == Pet.model_validate_json(r.choices[0].message.content)


def test_json_object_mode(server: LiveServer) -> None:
    r = server.openai().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format={"type": "json_object"},
        max_tokens=256,
        temperature=0,
    )
    choice = r.choices[0]
    # Any object is unbounded: complete within max_tokens it parses; cut short it is a prefix.
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_guided_extras(server: LiveServer) -> None:
    client = server.openai()
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=32,
        extra_body={"guided_choice": ["yes", "no", "maybe not"]},
    )
    assert r.choices[0].message.content in ("yes", "no", "maybe not")
    r = client.completions.create(
        model=MODEL,
        prompt="A code:",
        max_tokens=32,
        temperature=1.0,
        seed=4,
        extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"},
    )
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", r.choices[0].text)
    r = client.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=MAX_TOKENS,
        extra_body={"guided_json": SCHEMA},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": 5}},
                }
            },
            "response_format",
        ),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        # The constraint decides where the output ends; a length floor could contradict it.
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
    ],
)
def test_bad_constraints_are_400(server: LiveServer, body: dict, param: str) -> None:
    with server.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8, **body},
        )
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_langchain_with_structured_output(server: LiveServer) -> None:
    llm = server.langchain(MODEL, max_tokens=MAX_TOKENS, temperature=0)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("Describe a pet.")
    assert isinstance(pet, Pet)
    # json_mode sends {"type": "json_object"} (no schema): any object. Unbounded, so it may be cut
    # at max_tokens; include_raw shows which, and a complete one parses.
    out = llm.with_structured_output(method="json_mode", include_raw=True).invoke(
        "Describe a pet as JSON."
    )
    finish = out["raw"].response_metadata["finish_reason"]
    if finish == "stop":
        assert out["parsing_error"] is None and isinstance(out["parsed"], dict)
    else:
        assert finish == "length" and out["raw"].content.startswith("{")


def test_litellm_completion_with_response_format(server: LiveServer) -> None:
    import litellm

    r = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{server.base_url}/v1",
        api_key=server.keys["alice"],
        messages=MESSAGES,
        response_format=Pet,
        max_tokens=MAX_TOKENS,
        seed=6,
    )
    assert r.choices[0].finish_reason == "stop"
    Pet.model_validate_json(r.choices[0].message.content)


def test_langchain_streams_structured_output(server: LiveServer) -> None:
    llm = server.langchain(MODEL, max_tokens=MAX_TOKENS, temperature=0)
    parts = list(llm.with_structured_output(Pet, method="json_schema").stream("Describe a pet."))
    assert parts and isinstance(parts[-1], Pet)


def test_litellm_streams_with_response_format(server: LiveServer) -> None:
    import litellm

    chunks = list(
        litellm.completion(
            model=f"openai/{MODEL}",
            api_base=f"{server.base_url}/v1",
            api_key=server.keys["alice"],
            messages=MESSAGES,
            response_format=Pet,
            max_tokens=MAX_TOKENS,
            seed=6,
            stream=True,
        )
    )
    assert len(chunks) > 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    Pet.model_validate_json(text)
