"""Tool calls against a live server with the official `openai` client.

Proves: a request with tools (and a history of calls and results) is served on the tool
template's prompt, token for token (the in-process runtime's greedy answer on that prompt is the
server's, streamed and not); text that is not a call stays content, streamed exactly as the
whole; special-token text in tools and arguments stays text; wrong tools are 400s that name the
parameter (parameters or arguments nested too deep included); the `tool_chat_template` setting
replaces the template, and a broken file stops the server at start. `required` and named
choices (constrained by the grammar engine) return calls whose arguments validate against the
function's schema, streamed as OpenAI's deltas, and a full round trip (call, result, answer).

The tiny model has random weights: left to itself (`auto`) it never writes a call, so the
parser's positive cases are proven on text in tests/unit/test_tool_calls.py, and here through the
constrained choices.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jsonschema
import openai
import pytest

from server.api.protocol import ChatCompletionRequest
from server.api.tool_calls import ToolTemplate, plan_of, renderer, template_messages
from tests.api.live import LiveServer, reference, text_of

if TYPE_CHECKING:
    from server.runtime.elastic import ElasticRuntime

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "weather", "description": "Weather now", "parameters": WEATHER_PARAMS},
}
# No arguments at all: a constrained random model could otherwise write an object without end.
CLOCK = {
    "type": "function",
    "function": {
        "name": "clock",
        "parameters": {"type": "object", "additionalProperties": False},
    },
}
ASK = [{"role": "user", "content": "Oslo?"}]
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "9 C"},
]


def tool_prompt(rt: ElasticRuntime, **body: Any) -> list[int]:
    """The prompt ids the tool template gives this request (the server's default template)."""
    request = ChatCompletionRequest.model_validate({"model": "m", **body})
    plan = plan_of(request)
    return rt.tokenizer.encode_chat(
        template_messages(request.messages),
        tools=[f.as_prompt() for f in plan.functions] or None,
        render=renderer(ToolTemplate.load(None), plan),
    )


@pytest.mark.parametrize("messages", [ASK, HISTORY], ids=["ask", "history"])
def test_a_request_with_tools_is_served_on_the_tool_templates_prompt(
    server: LiveServer, rt: ElasticRuntime, messages: list
) -> None:
    client = server.openai()
    ids = tool_prompt(rt, messages=messages, tools=[WEATHER])
    plain = rt.tokenizer.encode_chat(ASK)
    assert len(ids) > len(plain) + 40  # the functions and the instruction are in it
    ref = reference(rt, "e2b", ids, 10)
    resp = client.chat.completions.create(
        model="e2b", messages=messages, tools=[WEATHER], max_tokens=10, temperature=0
    )
    (choice,) = resp.choices
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(ref.tokens)
    # Random weights write no call: the text is content, as the runtime wrote it.
    assert choice.message.tool_calls is None
    assert choice.message.content == text_of(rt, ref.tokens)
    assert choice.finish_reason == ("stop" if ref.finish_reason == "stop" else "length")

    stream = client.chat.completions.create(
        model="e2b",
        messages=messages,
        tools=[WEATHER],
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert all(c.choices[0].delta.tool_calls is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_tool_choice_none_offers_the_tools_but_says_not_to_call(
    server: LiveServer, rt: ElasticRuntime
) -> None:
    resp = server.openai().chat.completions.create(
        model="e2b", messages=ASK, tools=[CLOCK], tool_choice="none", max_tokens=1
    )
    none = tool_prompt(rt, messages=ASK, tools=[CLOCK], tool_choice="none")
    assert resp.usage.prompt_tokens == len(none)
    assert none != tool_prompt(rt, messages=ASK, tools=[CLOCK])


def test_sampled_text_streams_exactly_as_the_whole_with_tools(server: LiveServer) -> None:
    """Text that is not a call passes the streamed hold-back unchanged (two sampled choices)."""
    client = server.openai()
    kwargs: dict[str, Any] = dict(
        model="e2b", messages=HISTORY, tools=[WEATHER], max_tokens=24, seed=11, n=2, temperature=1
    )
    whole = client.chat.completions.create(**kwargs)
    streamed = ["", ""]
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert streamed == [c.message.content for c in whole.choices]
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert streamed[0] != streamed[1]  # sampled, with seed and seed + 1


def test_a_forced_choice_that_cannot_finish_a_call_is_content(server: LiveServer) -> None:
    """One token cannot be a whole call (constrained or not): the held text comes back as
    content, streamed as the whole gives it."""
    client = server.openai()
    kwargs: dict[str, Any] = dict(
        model="e2b", messages=ASK, tools=[CLOCK], tool_choice="required", max_tokens=1, seed=2
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.message.tool_calls is None and whole.finish_reason == "length"
    assert whole.message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_special_token_text_in_tools_and_calls_stays_text(
    server: LiveServer, rt: ElasticRuntime
) -> None:
    tool = {**CLOCK, "function": {**CLOCK["function"], "description": "<end_of_turn><bos>"}}
    history = json.loads(json.dumps(HISTORY).replace('Oslo\\"}', '<start_of_turn>\\"}'))
    ids = tool_prompt(rt, messages=history, tools=[tool])
    specials = {rt.tokenizer.bos_id, *rt.tokenizer.stop_ids}
    # the template's own markup only: one <bos>, and one <end_of_turn> per turn (3)
    assert sum(t in specials for t in ids) == 1 + 3
    resp = server.openai().chat.completions.create(
        model="e2b", messages=history, tools=[tool], max_tokens=1
    )
    assert resp.usage.prompt_tokens == len(ids)


def nested(depth: int) -> dict:
    """{"a": {"a": ... {}}} with `depth` objects."""
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# Deep enough to exhaust Python's recursion in the server's checks and rendering (a 500 before
# they were bounded), yet within what the client and the body parser accept.
DEEP = 900


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [{**CLOCK, "function": {"name": "c", "parameters": nested(DEEP)}}]},
            "tools.0.function.parameters",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "c", "arguments": json.dumps(nested(DEEP))},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "x"},
                ]
            },
            "messages.1.tool_calls.0.function.arguments",
        ),
        ({"tool_choice": "auto"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [{**CLOCK, "function": {"name": "c", "parameters": {"type": "array"}}}]},
            "tools.0.function.parameters",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        # A compulsory call fixes the output's format: a second constraint would contradict it.
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        (
            {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
            "messages.1.tool_call_id",
        ),
    ],
)
def test_wrong_tools_are_400_naming_the_parameter(
    server: LiveServer, fields: dict, param: str
) -> None:
    kwargs = {"model": "e2b", "messages": ASK, "max_tokens": 1, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        server.openai().chat.completions.create(**kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error"


# ---- with the grammar engine ---------------------------------------------------------------


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_valid_calls(server: LiveServer, parallel: bool) -> None:
    resp = server.openai().chat.completions.create(
        model="e2b",
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=150,  # the prompt is 359 tokens of the context's 512
        seed=3,
    )
    (choice,) = resp.choices
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    schemas = {"weather": WEATHER_PARAMS, "clock": CLOCK["function"]["parameters"]}
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_named_call_streams_as_deltas_and_round_trips(server: LiveServer) -> None:
    client = server.openai()
    named = {"type": "function", "function": {"name": "weather"}}
    chunks = list(
        client.chat.completions.create(
            model="e2b",
            messages=ASK,
            tools=[WEATHER, CLOCK],
            tool_choice=named,
            max_tokens=160,  # the prompt is 343 tokens of the context's 512
            seed=5,
            stream=True,
        )
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not c.choices[0].delta.content for c in chunks)

    # The call goes back with its result; the answer is text.
    answer = client.chat.completions.create(
        model="e2b",
        messages=[
            *ASK,
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": first.id,
                        "type": "function",
                        "function": {"name": "weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": first.id, "content": "9 C"},
        ],
        tools=[WEATHER, CLOCK],
        tool_choice="none",
        max_tokens=8,
    )
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)


# ---- the template file of the server setting -----------------------------------------------

CUSTOM = (
    "{{ bos_token }}<start_of_turn>user\n"
    "{% for t in tools %}TOOL {{ t.name }}\n{% endfor %}"
    "{% for m in messages %}{{ m.content }}\n{% endfor %}<end_of_turn>\n"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_the_tool_chat_template_setting_replaces_the_template(
    rt: ElasticRuntime, tiny_dir, tmp_path
) -> None:
    from server.api.tool_calls import ToolTemplate
    from tests.api.live import start_server

    (tmp_path / "tools.jinja").write_text(CUSTOM)
    live = start_server(tmp_path, tiny_dir, tool_chat_template="tools.jinja")  # relative
    try:
        resp = live.openai().chat.completions.create(
            model="e2b", messages=ASK, tools=[WEATHER, CLOCK], max_tokens=1
        )
    finally:
        live.stop()
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": ASK, "tools": [WEATHER, CLOCK]}
    )
    plan = plan_of(request)
    expected = rt.tokenizer.encode_chat(
        template_messages(request.messages),
        tools=[f.as_prompt() for f in plan.functions],
        render=renderer(ToolTemplate(CUSTOM), plan),
    )
    assert rt.tokenizer.decode(expected) == "user\nTOOL weather\nTOOL clock\nOslo?\n\nmodel\n"
    assert resp.usage.prompt_tokens == len(expected)


def test_a_broken_template_file_stops_the_server_at_start(tiny_dir, tmp_path) -> None:
    from tests.api.live import start_server

    (tmp_path / "tools.jinja").write_text("{% for t in tools %}")
    with pytest.raises(RuntimeError, match=r"tool chat template .*tools\.jinja"):
        start_server(tmp_path, tiny_dir, tool_chat_template="tools.jinja")
