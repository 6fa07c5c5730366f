"""Tool calls through real client libraries against a live server: LangChain's `ChatOpenAI`
(`bind_tools`, a tool round trip, `with_structured_output(method="function_calling")`, streamed
and not) and LiteLLM's `completion` with `tools` and `tool_choice` (streamed and not).

The random-weight model never calls a tool by itself, so some tests check that what the
libraries send is accepted and answered (a history of calls and results, tools offered), and the
forced choices (constrained by the grammar engine) return calls whose arguments validate.
"""

from __future__ import annotations

import asyncio
import json
import os

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.api.live import LiveServer

# LiteLLM fetches its model price list from the internet at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(autouse=True, scope="module")
def close_litellm_event_loop():
    """Close the event loop LiteLLM leaves behind. Its synchronous `completion` logs through
    `asyncio.get_event_loop()`, which makes and sets a loop on this thread that nothing closes;
    the garbage collector then warns of it ("unclosed event loop", a ResourceWarning) during
    whichever later test it happens to run in, on this xdist worker."""
    yield
    policy = asyncio.get_event_loop_policy()
    try:
        loop = policy.get_event_loop()
    except RuntimeError:  # no loop set (and newer Pythons make none)
        return
    if not loop.is_running():
        loop.close()
    policy.set_event_loop(None)


CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}


def weather_tool():
    from langchain_core.tools import tool

    @tool(args_schema=CITY_SCHEMA)
    def weather(city: str) -> str:
        """The weather in a city now."""
        return f"9 C in {city}"

    return weather


def test_langchain_sends_a_tool_history_that_is_answered(server: LiveServer) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    llm = server.langchain("e2b", max_tokens=6, temperature=0)
    bare = llm.invoke([HumanMessage("Oslo?")])
    reply = llm.bind_tools([weather_tool()]).invoke(
        [
            HumanMessage("Oslo?"),
            AIMessage(
                content="", tool_calls=[{"name": "weather", "args": {"city": "Oslo"}, "id": "c1"}]
            ),
            ToolMessage("9 C", tool_call_id="c1"),
        ]
    )
    assert isinstance(reply.content, str) and reply.tool_calls == []
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    # the tools, the call and its result are in the prompt
    assert reply.usage_metadata["input_tokens"] > bare.usage_metadata["input_tokens"] + 40


def test_litellm_sends_tools_and_a_history_that_are_answered(server: LiveServer) -> None:
    import litellm

    messages = [
        {"role": "user", "content": "Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "9 C"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": CITY_SCHEMA}}]
    r = litellm.completion(
        model="openai/e2b",
        api_base=f"{server.base_url}/v1",
        api_key=server.keys["alice"],
        messages=messages,
        tools=tools,
        tool_choice="auto",
        max_tokens=6,
        temperature=0,
    )
    assert isinstance(r.choices[0].message.content, str)
    assert not r.choices[0].message.tool_calls
    assert r.usage.prompt_tokens > 40


def test_langchain_bind_tools_round_trip(server: LiveServer) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    weather = weather_tool()
    llm = server.langchain("e2b", max_tokens=120, seed=4)
    ask = HumanMessage("Oslo?")
    call_msg = llm.bind_tools([weather], tool_choice="weather").invoke([ask])
    (call,) = call_msg.tool_calls
    assert call["name"] == "weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], CITY_SCHEMA)
    result = ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])
    llm = server.langchain("e2b", max_tokens=8).bind_tools([weather])
    answer = llm.invoke([ask, call_msg, result])
    assert isinstance(answer.content, str)


def test_langchain_with_structured_output_function_calling(server: LiveServer) -> None:

    # Bounded fields only: an integer's digits have no end the grammar could force, and a
    # random-weight model may write digits until max_tokens (a truncated call is content).
    class City(BaseModel):
        """A city."""

        name: str = Field(max_length=12)
        capital: bool

    structured = server.langchain("e2b", max_tokens=120, seed=6).with_structured_output(
        City, method="function_calling"
    )
    city = structured.invoke("Name a city.")
    assert isinstance(city, City)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "weather"}}]
)
def test_litellm_forced_tool_choice_returns_a_valid_call(server: LiveServer, tool_choice) -> None:
    import litellm

    r = litellm.completion(
        model="openai/e2b",
        api_base=f"{server.base_url}/v1",
        api_key=server.keys["alice"],
        messages=[{"role": "user", "content": "Oslo?"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": CITY_SCHEMA}}],
        tool_choice=tool_choice,
        max_tokens=120,
        seed=8,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls[:1]
    assert call.function.name == "weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY_SCHEMA)


def test_langchain_streams_a_forced_call_and_a_structured_output(server: LiveServer) -> None:
    from langchain_core.messages import HumanMessage

    weather = weather_tool()
    llm = server.langchain("e2b", max_tokens=120, seed=4)
    chunks = list(llm.bind_tools([weather], tool_choice="weather").stream([HumanMessage("Oslo?")]))
    assert len(chunks) > 1
    message = chunks[0]
    for chunk in chunks[1:]:
        message = message + chunk  # LangChain joins the streamed tool-call deltas
    (call,) = message.tool_calls
    assert call["name"] == "weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], CITY_SCHEMA)

    class City(BaseModel):
        """A city."""

        name: str = Field(max_length=12)
        capital: bool

    structured = server.langchain("e2b", max_tokens=120, seed=6).with_structured_output(
        City, method="function_calling"
    )
    parts = list(structured.stream("Name a city."))
    assert parts and isinstance(parts[-1], City)


def test_litellm_streams_a_forced_call(server: LiveServer) -> None:
    import litellm

    weather = {"type": "function", "function": {"name": "weather", "parameters": CITY_SCHEMA}}
    chunks = list(
        litellm.completion(
            model="openai/e2b",
            api_base=f"{server.base_url}/v1",
            api_key=server.keys["alice"],
            messages=[{"role": "user", "content": "Oslo?"}],
            tools=[weather],
            tool_choice={"type": "function", "function": {"name": "weather"}},
            max_tokens=120,
            seed=8,
            stream=True,
        )
    )
    r = litellm.stream_chunk_builder(chunks)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY_SCHEMA)
