"""Structured-output fields (response_format, vLLM's guided_*) into one StructuredOutput, and the
shape checks that refuse a bad one by the field's name (server/api/constraints.py,
SamplingParams.validate). Whether a schema compiles is tests/runtime/test_structured_output.py's
and tests/api/test_structured_output.py's."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from server.api.constraints import requested_constraint
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.vocabulary.sampling_params import (
    MAX_STRUCTURED_CHARS,
    SamplingParams,
    SamplingParamsError,
)
from server.vocabulary.structured_output import StructuredOutput

SCHEMA = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_no_constraint_and_text_are_free():
    assert requested_constraint(chat()) is None
    assert requested_constraint(chat(response_format={"type": "text"})) is None


def test_json_object_is_any_object():
    got = requested_constraint(chat(response_format={"type": "json_object"}))
    assert got == (StructuredOutput("json"), "response_format")


def test_json_schema_keeps_the_property_order():
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    structured, field = requested_constraint(chat(response_format=rf))
    assert field == "response_format" and structured.kind == "json_schema"
    assert json.loads(structured.spec) == SCHEMA
    assert list(json.loads(structured.spec)["properties"]) == ["z", "a"]  # as the client sent it


def test_json_schema_without_schema_is_any_object():
    rf = {"type": "json_schema", "json_schema": {"name": "x", "description": "anything"}}
    assert requested_constraint(chat(response_format=rf)) == (
        StructuredOutput("json"),
        "response_format",
    )


def test_equal_schemas_give_equal_constraints():
    # One compiled grammar serves a schema sent as an object or as the same compact text.
    a = requested_constraint(chat(guided_json=SCHEMA))
    b = requested_constraint(chat(guided_json=json.dumps(SCHEMA, separators=(",", ":"))))
    c = requested_constraint(
        chat(
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
        )
    )
    assert a[0] == b[0] == c[0]
    assert (a[1], b[1], c[1]) == ("guided_json", "guided_json", "response_format")


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"guided_regex": "[a-z]+"}, StructuredOutput("regex", "[a-z]+")),
        ({"guided_choice": ["yes", "no"]}, StructuredOutput("choice", '["yes","no"]')),
        ({"guided_grammar": 'root ::= "a"'}, StructuredOutput("grammar", 'root ::= "a"')),
    ],
)
def test_vllm_extras(fields, want):
    [name] = fields
    assert requested_constraint(chat(**fields)) == (want, name)
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})
    assert requested_constraint(completion) == (want, name)


def test_completions_take_response_format_too():
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": "p", "response_format": {"type": "json_object"}}
    )
    assert requested_constraint(body) == (StructuredOutput("json"), "response_format")


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "json_object"}, "guided_regex": "a"},
        {"guided_json": SCHEMA, "guided_choice": ["a"]},
        {"guided_regex": "a", "guided_grammar": 'root ::= "a"'},
    ],
)
def test_two_constraints_are_refused_naming_both(fields):
    with pytest.raises(APIError) as e:
        requested_constraint(chat(**fields))
    assert e.value.status == 400
    for name in fields:
        assert name in e.value.message
    assert e.value.param in fields


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": "[1, 2]"}, "guided_json", "must be an object"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_choice": ["a", ""]}, "guided_choice", "non-empty strings"),
        ({"guided_regex": ""}, "guided_regex", "empty"),
        ({"guided_grammar": "x" * (MAX_STRUCTURED_CHARS + 1)}, "guided_grammar", "at most"),
    ],
)
def test_bad_shapes_are_400_naming_the_field(fields, param, says):
    with pytest.raises(APIError) as e:
        requested_constraint(chat(**fields))
    assert (e.value.status, e.value.param) == (400, param)
    assert says in e.value.message


@pytest.mark.parametrize(
    "rf",
    [
        {"type": "json"},  # not an OpenAI type
        {"type": "json_schema"},  # json_schema missing
        {"type": "json_object", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"schema": SCHEMA}},  # name is required
        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "extra": 1}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}},
        {"type": "text", "unknown": True},
    ],
)
def test_malformed_response_format_is_a_validation_error(rf):
    with pytest.raises(ValidationError) as e:
        chat(response_format=rf)
    assert "response_format" in str(e.value)


@pytest.mark.parametrize(
    ("structured", "says"),
    [
        (StructuredOutput("yaml", "x"), "kind"),  # type: ignore[arg-type]
        (StructuredOutput("json_schema", "{"), "not valid JSON"),
        (StructuredOutput("choice", '["a", 1]'), "non-empty strings"),
        (StructuredOutput("regex", ""), "empty"),
        ("json", "StructuredOutput"),
    ],
)
def test_sampling_params_validate_the_constraint(structured, says):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(structured=structured).validate(512)  # type: ignore[arg-type]
    assert e.value.param == "structured" and says in e.value.message


def test_valid_constraints_pass():
    for s in (
        StructuredOutput("json"),
        StructuredOutput("json_schema", json.dumps(SCHEMA)),
        StructuredOutput("json_schema", "true"),
        StructuredOutput("regex", "a+"),
        StructuredOutput("choice", '["a"]'),
        StructuredOutput("grammar", 'root ::= "a"'),
    ):
        SamplingParams(structured=s).validate(512)
