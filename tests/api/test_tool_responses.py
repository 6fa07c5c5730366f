"""The chat response shapes of tool calls, from scripted engine outputs (no model): what the
official `openai` client parses out of the body and the streamed chunks when the output is a
call (the tiny random model only writes one under the grammar engine, tests/api/test_tool_calls).

Proves: a whole call becomes `message.tool_calls` with finish_reason tool_calls and no content;
streamed, the text before a call streams as content, then per call a delta with index, id, type
and name, then its arguments, then a last chunk with finish_reason tool_calls; the streamed
deltas put together equal the whole body's calls; a forced choice's bare JSON is read the same.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.api.protocol import ChatCompletionRequest
from server.api.responses import chat_body, chat_chunks
from server.api.tool_calls import plan_of
from server.engine.outputs import RequestOutput

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "clock"}},
]
AUTO_TEXT = [
    "Let me ",
    "check. <tool",
    '_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>',
    '<tool_call>{"name": "clock", "arguments": {}}</tool_call>',
]
FORCED_TEXT = ['[{"name": "clock", ', '"arguments": {}}, {"name": "weather", "arguments": {}}]']


class Scripted:
    """A request stream that yields scripted outputs."""

    def __init__(self, pieces: list[str]):
        self.outs = [
            RequestOutput(
                "r",
                "e2b",
                text=p,
                finished=k == len(pieces) - 1,
                finish_reason="stop" if k == len(pieces) - 1 else None,
            )
            for k, p in enumerate(pieces)
        ]

    def __aiter__(self):
        async def gen():
            for out in self.outs:
                yield out

        return gen()


def submission(pieces: list[str]):
    return SimpleNamespace(
        streams=[Scripted(pieces)], response_id="x", created=0, subnet_name="e2b", cut_short=False
    )


def run(pieces: list[str], **fields):
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Oslo?"}], "tools": TOOLS, **fields}
    )
    plan = plan_of(body)
    sub = submission(pieces)
    finals = {0: sub.streams[0].outs[-1]}
    whole = chat_body(sub, body, finals, {0: ("".join(pieces), [])}, None, plan=plan)
    whole.update(created=0, model="m")
    completion = ChatCompletion.model_validate(whole)

    async def collect():
        return [c async for c in chat_chunks(sub, "m", None, False, plan=plan)]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e[6:])) for e in events[:-1]]
    return completion, chunks


@pytest.mark.parametrize(
    ("pieces", "fields", "content"),
    [
        (AUTO_TEXT, {}, "Let me check. "),
        (FORCED_TEXT, {"tool_choice": "required"}, None),
    ],
)
def test_calls_in_the_body_and_as_streamed_deltas(pieces, fields, content) -> None:
    completion, chunks = run(pieces, **fields)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == content
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert sorted(calls) == [("clock", {}), ("weather", {"city": "Oslo"} if content else {})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)

    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == (content or "")
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    by_index: dict[int, dict] = {}
    for d in deltas:
        if d.index not in by_index:  # the first delta of a call names it
            assert d.id.startswith("call_") and d.type == "function" and d.function.name
            by_index[d.index] = {"name": d.function.name, "arguments": ""}
        else:
            assert d.id is None and d.function.name is None
        by_index[d.index]["arguments"] += d.function.arguments or ""
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(by_index.items())] == calls
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_parallel_false_keeps_one_call_in_the_body_and_the_stream() -> None:
    completion, chunks = run(AUTO_TEXT, parallel_tool_calls=False)
    assert [c.function.name for c in completion.choices[0].message.tool_calls] == ["weather"]
    assert {d.index for c in chunks for d in (c.choices[0].delta.tool_calls or [])} == {0}


def test_tool_choice_none_returns_the_text() -> None:
    completion, chunks = run(AUTO_TEXT, tool_choice="none")
    assert completion.choices[0].message.content == "".join(AUTO_TEXT)
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(AUTO_TEXT)
