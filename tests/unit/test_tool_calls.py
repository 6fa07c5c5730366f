"""Tool calls without a model: the tool template's rendering, the parser, the streamed hold-back,
the call schemas and the request checks (server/api/tool_calls.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest
from server.api.tool_calls import (
    CALL_CLOSE,
    CALL_OPEN,
    ToolPlan,
    ToolStream,
    ToolTemplate,
    ToolTemplateError,
    finish_reason,
    parse_output,
    plan_of,
    template_messages,
)
from server.config import ConfigError, load_config

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters at all


def request(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    return ChatCompletionRequest.model_validate({**body, **fields})


def render(body: ChatCompletionRequest, template: ToolTemplate | None = None) -> str:
    plan = plan_of(body)
    return (template or ToolTemplate.load(None)).render(
        template_messages(body.messages),
        [f.as_prompt() for f in plan.functions] or None,
        plan.template_choice(),
        plan.parallel,
        "<bos>",
    )


ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "24 C"},
]


# ---- the template ---------------------------------------------------------------------------


def test_the_template_renders_tools_calls_and_results_in_gemma_turns() -> None:
    prompt = render(request(messages=ROUND_TRIP, tools=[WEATHER, TIME]))
    turns = re.findall(r"<start_of_turn>(\w+)\n(.*?)<end_of_turn>\n", prompt, re.S)
    # system + tools in the first user turn; two results share one user turn; turns alternate
    assert [who for who, _ in turns] == ["user", "model", "user"]
    assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\n")
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    first = turns[0][1]
    listed = [json.loads(line) for line in first.splitlines() if line.startswith('{"name"')]
    assert listed == [
        {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": WEATHER["function"]["parameters"],
        },
        {"name": "get_time", "parameters": {"type": "object"}},
    ]
    assert first.rstrip().endswith("Weather in Paris and Rome?")
    assert CALL_OPEN in first  # the auto instruction shows the call form
    # The history's calls are in exactly the form the parser reads back.
    plan = plan_of(request(tools=[WEATHER, TIME]))
    parsed = parse_output(turns[1][1], plan)
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    results = re.findall(r"<tool_response>(.*?)</tool_response>", turns[2][1])
    assert [json.loads(r) for r in results] == [
        {"tool_call_id": "call_a", "name": "get_weather", "content": "18 C"},
        {"tool_call_id": "call_b", "name": "get_weather", "content": "24 C"},
    ]


def test_the_instruction_follows_tool_choice() -> None:
    auto = render(request(tools=[WEATHER, TIME]))
    none = render(request(tools=[WEATHER, TIME], tool_choice="none"))
    named = render(
        request(
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    )
    required = render(request(tools=[WEATHER, TIME], tool_choice="required"))
    single = render(
        request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    )
    assert "without calling a function" in none and CALL_OPEN not in none
    assert "Call get_time now" in named
    assert '{"name": "get_time", "arguments"' in named
    assert "JSON list" in required and "JSON list" not in single
    assert "Call one function now" in single
    assert len({auto, none, named, required, single}) == 5


def test_a_request_without_tools_renders_like_the_dev_template() -> None:
    """History with calls but no tools: the tools block is left out entirely."""
    body = request(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert render(body) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_the_template_refuses_a_conversation_that_starts_with_the_model() -> None:
    body = request(messages=[{"role": "assistant", "content": "Hi"}], tools=[WEATHER])
    with pytest.raises(ToolTemplateError, match="must be a user message"):
        render(body)


def test_a_template_file_replaces_the_built_in_one(tmp_path: Path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text(
        "{% for t in tools %}[{{ t.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    )
    assert render(request(tools=[WEATHER, TIME]), ToolTemplate.load(path)) == (
        "[get_weather][get_time]user:Weather in Paris?;"
    )
    path.write_text("{% for t in tools %}")
    with pytest.raises(ToolTemplateError, match=r"mine\.jinja"):
        ToolTemplate.load(path)
    with pytest.raises(ToolTemplateError, match="cannot read"):
        ToolTemplate.load(tmp_path / "absent.jinja")


def test_the_config_key_is_a_path_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text("tool_chat_template: templates/tools.jinja\n")
    config = load_config(tmp_path / "server.yaml", env={})
    assert config.tool_chat_template == str(tmp_path / "templates" / "tools.jinja")
    assert load_config(None, env={}).tool_chat_template is None  # the built-in one
    (tmp_path / "bad.yaml").write_text("tool_chat_template: 3\n")
    with pytest.raises(ConfigError, match="tool_chat_template"):
        load_config(tmp_path / "bad.yaml", env={})


# ---- the parser -----------------------------------------------------------------------------

AUTO = plan_of(request(tools=[WEATHER, TIME]))


def call(name: str, arguments: dict) -> str:
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + CALL_CLOSE


def summary(parsed) -> tuple:
    return parsed.content, [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It is sunny.", ("It is sunny.", [])),
        (call("get_weather", {"city": "Oslo"}), (None, [("get_weather", {"city": "Oslo"})])),
        (
            "Let me look. " + call("get_time", {}) + "\n" + call("get_weather", {"city": "Oslo"}),
            ("Let me look. \n", [("get_time", {}), ("get_weather", {"city": "Oslo"})]),
        ),
        # one block holding a list of calls
        (
            CALL_OPEN + '[{"name": "get_time", "arguments": {}}, {"name": "get_time"}]',
            (None, [("get_time", {}), ("get_time", {})]),
        ),
        # arguments written as a JSON string; the closing marker cut off by the end
        (
            CALL_OPEN + '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}',
            (None, [("get_weather", {"city": "Oslo"})]),
        ),
    ],
)
def test_calls_are_parsed_out_of_the_text(text: str, expected: tuple) -> None:
    parsed = parse_output(text, AUTO)
    assert summary(parsed) == expected
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)
    assert finish_reason("stop", parsed) == ("tool_calls" if parsed.calls else "stop")
    assert finish_reason("length", parsed) == "length"


@pytest.mark.parametrize(
    "text",
    [
        CALL_OPEN + '{"name": "get_weather", "arguments": {"city": "Oslo"}',  # cut short
        call("delete_everything", {}),  # not an offered function
        CALL_OPEN + '{"name": "get_time", "arguments": [1]}' + CALL_CLOSE,  # not an object
        CALL_OPEN + '{"name": "get_time", "args": {}}' + CALL_CLOSE,  # unknown key
        call("get_time", {}) + CALL_OPEN + "oops" + CALL_CLOSE,  # one bad block spoils all
        '{"name": "get_time", "arguments": {}}',  # bare JSON: only forced choices read it
    ],
)
def test_text_that_is_not_entirely_calls_stays_content(text: str) -> None:
    assert summary(parse_output(text, AUTO)) == (text, [])


def test_none_never_parses_and_parallel_false_keeps_the_first_call() -> None:
    text = call("get_time", {}) + call("get_weather", {"city": "Oslo"})
    assert summary(parse_output(text, plan_of(request(tools=[TIME], tool_choice="none")))) == (
        text,
        [],
    )
    single = plan_of(request(tools=[WEATHER, TIME], parallel_tool_calls=False))
    assert summary(parse_output(text, single)) == (None, [("get_time", {})])


def test_forced_choices_read_the_bare_json_the_constraint_makes() -> None:
    named = plan_of(
        request(
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    assert summary(
        parse_output('{"name": "get_weather", "arguments": {"city": "Oslo"}}', named)
    ) == (
        None,
        [("get_weather", {"city": "Oslo"})],
    )
    # a named choice returns only that function
    assert parse_output('{"name": "get_time", "arguments": {}}', named).calls == ()
    required = plan_of(request(tools=[WEATHER, TIME], tool_choice="required"))
    both = json.dumps(
        [
            {"name": "get_time", "arguments": {}},
            {"name": "get_weather", "arguments": {"city": "Oslo"}},
        ]
    )
    assert summary(parse_output(both, required))[1] == [
        ("get_time", {}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert parse_output("[]", required).calls == ()


# ---- streaming ------------------------------------------------------------------------------

STREAMED = [
    "Plain text with a < sign and <tool but no call.",
    "Text first. " + call("get_weather", {"city": "Oslo"}) + " and after.",
    call("get_time", {}) + call("get_weather", {"city": "Bergen"}),
    CALL_OPEN + '{"name": "get_time", "arguments": {}',  # never completes: all content
    "ends on a partial marker <tool_c",
]


@pytest.mark.parametrize("text", STREAMED)
@pytest.mark.parametrize(
    "plan", [AUTO, plan_of(request(tools=[WEATHER, TIME], tool_choice="required"))]
)
def test_streaming_gives_what_the_whole_text_gives_at_every_split(
    text: str, plan: ToolPlan
) -> None:
    whole = summary(parse_output(text, plan))
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1, 7):
            stream = ToolStream(plan)
            sent = "".join(stream.push(piece) for piece in (text[:a], text[a:b], text[b:]))
            end = stream.finish()
            content = sent + (end.content or "")
            calls = [(c.name, json.loads(c.arguments)) for c in end.calls]
            assert calls == whole[1], (a, b)
            if whole[1]:
                # Only the text before the first call was sent before the end.
                assert sent == ("" if plan.forced else text.split(CALL_OPEN)[0]), (a, b)
                assert content.strip() == (whole[0] or "").strip(), (a, b)
            else:
                assert content == text, (a, b)


# ---- the call schemas -----------------------------------------------------------------------


def test_the_call_schemas_accept_exactly_the_calls_of_the_chosen_functions() -> None:
    def valid(schema: dict, value) -> bool:
        return jsonschema.Draft202012Validator(schema).is_valid(value)

    named = plan_of(
        request(
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    ).call_schema()
    jsonschema.Draft202012Validator.check_schema(named)
    assert valid(named, {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}})
    assert not valid(named, {"name": "get_weather", "arguments": {"unit": "C"}})  # city required
    assert not valid(named, {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "K"}})
    assert not valid(named, {"name": "get_time", "arguments": {}})
    assert not valid(named, {"name": "get_weather", "arguments": {"city": "O"}, "x": 1})

    parallel = plan_of(request(tools=[WEATHER, TIME], tool_choice="required")).call_schema()
    jsonschema.Draft202012Validator.check_schema(parallel)
    assert valid(parallel, [{"name": "get_time", "arguments": {}}])
    assert valid(parallel, [{"name": "get_time", "arguments": {}}] * 2)
    assert not valid(parallel, [])
    assert not valid(parallel, {"name": "get_time", "arguments": {}})

    single = plan_of(
        request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    ).call_schema()
    assert valid(single, {"name": "get_time", "arguments": {}})
    assert not valid(single, [{"name": "get_time", "arguments": {}}])
    assert plan_of(request(tools=[WEATHER])).call_schema() is None  # auto: free


# ---- the checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls", "only allowed when tools"),
        ({"tools": []}, "tools", "must not be empty"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "'x', which is not among tools",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools", "given twice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools.0.function.parameters",
            "JSON schema of an object",
        ),
        (
            {"tools": [TIME, {"type": "function", "function": {"name": "two words"}}]},
            "tools.1.function.name",
            "letters, digits",
        ),
    ],
)
def test_wrong_tools_are_refused_naming_the_parameter(fields: dict, param: str, words: str) -> None:
    with pytest.raises(APIError) as e:
        plan_of(request(**fields))
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_a_tool_result_must_answer_an_earlier_call() -> None:
    stray = [
        {"role": "user", "content": "Hi"},
        {"role": "tool", "tool_call_id": "call_x", "content": "18 C"},
    ]
    with pytest.raises(APIError) as e:
        template_messages(request(messages=stray).messages)
    assert e.value.param == "messages.1.tool_call_id"
    bad = [dict(m) for m in ROUND_TRIP]
    bad[2] = {
        **bad[2],
        "tool_calls": [
            {**bad[2]["tool_calls"][0], "function": {"name": "get_weather", "arguments": "{city"}}
        ],
    }
    with pytest.raises(APIError) as e:
        template_messages(request(messages=bad[:3]).messages)
    assert e.value.param == "messages.2.tool_calls.0.function.arguments"


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": None},  # only an assistant with calls may omit content
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "x"},  # no tool_call_id
        {"role": "user", "content": "x", "tool_call_id": "call_a"},
        {"role": "user", "content": "x", "tool_calls": ROUND_TRIP[2]["tool_calls"]},
    ],
)
def test_message_shapes_are_checked(message: dict) -> None:
    with pytest.raises(ValueError):
        request(messages=[message])
