"""Tool calls on chat completions: the prompt format, the checks, the parser and the call schema.

Gemma 3n has no tool tokens, so the format is text, owned here and in the template beside this
file (`tool_chat_template.jinja`, replaceable with the server setting `tool_chat_template`):

- the functions, one JSON object per line ({"name", "description", "parameters"}), and an
  instruction go into the first user turn (after the system message, as Gemma's template puts
  it);
- the model calls a function by answering
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (several
  blocks: parallel calls); text outside the blocks is content;
- the history renders an assistant's calls in that same form, and each tool result as
  `<tool_response>{"tool_call_id", "name", "content"}</tool_response>` in a user turn (Gemma's
  turns alternate user/model; consecutive results share one turn).

`tool_choice`: `auto` generates freely and parses the output afterwards; `none` offers the tools
in the prompt but never parses (vLLM's default); `required` and a named function constrain the
output to the JSON of the call(s) (`call_schema`, submitted as a json_schema `StructuredOutput`),
so the output is the bare JSON, which the parser also accepts. A call is returned only when it
parses completely and names an offered function; anything else stays content.

Deliberately does not know: tokens, the tokenizer, sampling, or response shapes (responses.py
places what `ParsedOutput` holds).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, ChatMessage

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
DEFAULT_TEMPLATE = Path(__file__).with_name("tool_chat_template.jinja")
# OpenAI's rule for function names; it also keeps a name printable in any prompt format.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Nesting of objects and arrays in a function's parameters or a call's arguments: far beyond
# any real schema, and far below what would exhaust Python's recursion (rendering, checks).
MAX_DEPTH = 64


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


# ---- the request's tools --------------------------------------------------------------------


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema of an object ({"type": "object"} when not given)

    def as_prompt(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name}
        if self.description:
            entry["description"] = self.description
        entry["parameters"] = self.parameters
        return entry


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its prompt and its output. `choice`: none, auto,
    required or named (then `named` is the function)."""

    functions: tuple[Function, ...] = ()
    choice: str = "none"
    named: str | None = None
    parallel: bool = True

    @property
    def parses(self) -> bool:
        """The output is searched for calls."""
        return bool(self.functions) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """The output must be the call(s): constrained to `call_schema`."""
        return self.choice in ("required", "named")

    def function(self, name: str) -> Function | None:
        return next((f for f in self.functions if f.name == name), None)

    def call_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must match when a call is compulsory; None otherwise.
        Named: that function's call. Required: a call of any offered function, and with
        parallel_tool_calls an array of at least one."""
        if not self.forced:
            return None
        if self.choice == "named":
            fn = self.function(self.named or "")
            assert fn is not None  # checked by plan_of
            return _one_call(fn)
        calls = [_one_call(f) for f in self.functions]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel:
            return {"type": "array", "items": one, "minItems": 1}
        return one

    def template_choice(self) -> str | dict[str, Any]:
        """`tool_choice` as the template sees it."""
        if self.choice == "named":
            return {"type": "function", "function": {"name": self.named}}
        return self.choice


def _one_call(fn: Function) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [fn.name]},
            "arguments": fn.parameters,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def plan_of(body: ChatCompletionRequest) -> ToolPlan:
    """The request's tools, checked: a 400 naming the parameter for every wrong shape."""
    if body.tools is None:
        if body.tool_choice is not None:
            raise APIError(
                400, "tool_choice is only allowed when tools are specified", param="tool_choice"
            )
        if body.parallel_tool_calls is not None:
            raise APIError(
                400,
                "parallel_tool_calls is only allowed when tools are specified",
                param="parallel_tool_calls",
            )
        return ToolPlan()
    if not body.tools:
        raise APIError(400, "tools must not be empty (leave it out instead)", param="tools")
    functions: list[Function] = []
    seen: set[str] = set()
    for i, tool in enumerate(body.tools):
        fn = tool.function
        where = f"tools.{i}.function"
        if not _NAME.match(fn.name):
            raise APIError(
                400,
                f"{where}.name {fn.name!r} must be 1-64 letters, digits, underscores or dashes",
                param=f"{where}.name",
            )
        if fn.name in seen:
            raise APIError(
                400, f"{where}.name {fn.name!r} is given twice; names must be unique", param="tools"
            )
        seen.add(fn.name)
        params = fn.parameters if fn.parameters is not None else {"type": "object"}
        if _too_deep(params):
            raise APIError(
                400,
                f"{where}.parameters nests objects and arrays more than {MAX_DEPTH} deep",
                param=f"{where}.parameters",
            )
        if params.get("type", "object") != "object":
            raise APIError(
                400,
                f"{where}.parameters must be the JSON schema of an object "
                f'({{"type": "object", ...}}), got type {params.get("type")!r}',
                param=f"{where}.parameters",
            )
        if "properties" in params and not isinstance(params["properties"], dict):
            raise APIError(
                400,
                f"{where}.parameters.properties must be an object",
                param=f"{where}.parameters",
            )
        functions.append(Function(fn.name, fn.description, {"type": "object", **params}))
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    named = None
    if not isinstance(choice, str):
        named = choice.function.name
        if named not in seen:
            raise APIError(
                400,
                f"tool_choice names function {named!r}, which is not among tools "
                f"({', '.join(sorted(seen))})",
                param="tool_choice",
            )
        choice = "named"
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    return ToolPlan(tuple(functions), choice, named, parallel)


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The chat history as the tool template sees it: assistant calls with their arguments
    parsed, each tool result with the name of the function it answers. A tool result must
    answer a call of an earlier assistant message (as OpenAI requires)."""
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # call id -> function name
    for i, m in enumerate(messages):
        entry: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
        }
        if m.tool_calls:
            entry["tool_calls"] = []
            for j, call in enumerate(m.tool_calls):
                where = f"messages.{i}.tool_calls.{j}.function.arguments"
                try:
                    arguments = json.loads(call.function.arguments)
                except (ValueError, RecursionError):
                    raise APIError(400, f"{where} is not valid JSON", param=where) from None
                if _too_deep(arguments):
                    raise APIError(400, f"{where} nests more than {MAX_DEPTH} deep", param=where)
                calls[call.id] = call.function.name
                entry["tool_calls"].append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
        if m.role == "tool":
            if m.tool_call_id not in calls:
                raise APIError(
                    400,
                    f"messages.{i}: a tool message must answer a tool call of an earlier "
                    f"assistant message; no call has id {m.tool_call_id!r}",
                    param=f"messages.{i}.tool_call_id",
                )
            entry["tool_call_id"] = m.tool_call_id
            entry["name"] = calls[m.tool_call_id]
        out.append(entry)
    return out


def uses_tools(body: ChatCompletionRequest) -> bool:
    """The request needs the tool template: it offers tools, or its history holds calls or
    results (which the checkpoint's own template cannot render)."""
    return body.tools is not None or any(m.role == "tool" or m.tool_calls for m in body.messages)


# ---- the template ---------------------------------------------------------------------------


class ToolTemplateError(ValueError):
    pass


def _tojson(value: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    # Non-ASCII kept as it is, as transformers' chat templates do (a message's text is not
    # turned into \\u escapes the model never saw in training).
    separators = None if indent else (", ", ": ")
    return json.dumps(
        value, ensure_ascii=False, indent=indent, sort_keys=sort_keys, separators=separators
    )


def _raise(message: str) -> None:
    raise ToolTemplateError(message)


class ToolTemplate:
    """A Jinja chat template that knows tools, in transformers' sandbox and dialect
    (`tojson`, `raise_exception`, trim_blocks and lstrip_blocks). Variables: messages (as
    `template_messages` gives them), tools (the functions as `Function.as_prompt` gives them, or
    none), tool_choice ("none", "auto", "required" or {"type": "function", "function": {"name"}}),
    parallel_tool_calls, call_open, call_close, bos_token, add_generation_prompt."""

    def __init__(self, source: str, origin: str = "<string>"):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ToolTemplateError(f"tool chat template {origin}: {e}") from None
        self.origin = origin

    @classmethod
    def load(cls, path: str | Path | None) -> ToolTemplate:
        """The template file at `path`, or the built-in one."""
        file = Path(path) if path else DEFAULT_TEMPLATE
        try:
            source = file.read_text(encoding="utf-8")
        except OSError as e:
            raise ToolTemplateError(f"tool chat template {file}: cannot read it ({e})") from None
        return cls(source, str(file))

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any],
        parallel_tool_calls: bool,
        bos_token: str,
        add_generation_prompt: bool = True,
    ) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                tool_choice=tool_choice,
                parallel_tool_calls=parallel_tool_calls,
                call_open=CALL_OPEN,
                call_close=CALL_CLOSE,
                bos_token=bos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except ToolTemplateError:
            raise
        except Exception as e:  # the template's own errors (undefined names, bad types)
            raise ToolTemplateError(f"tool chat template {self.origin} failed: {e}") from None


def renderer(template: ToolTemplate, plan: ToolPlan):
    """The request's render function for `TextTokenizer.encode_chat`."""

    def render(messages, tools, bos_token: str, add_generation_prompt: bool) -> str:
        return template.render(
            messages, tools, plan.template_choice(), plan.parallel, bos_token, add_generation_prompt
        )

    return render


# ---- the output -----------------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedOutput:
    """A choice's output: its content (None when it is only calls) and its calls."""

    content: str | None
    calls: tuple[ToolCall, ...] = field(default_factory=tuple)


def _calls_of(value: Any, plan: ToolPlan) -> list[ToolCall] | None:
    """Calls from one decoded JSON value (a call object or a list of them), or None when it is
    not entirely made of calls of offered functions."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if set(item) - {"name", "arguments"}:
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):  # a model may write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict) or plan.function(item["name"]) is None:
            return None
        if plan.choice == "named" and item["name"] != plan.named:
            return None
        text = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(new_call_id(), item["name"], text))
    return calls


def _marked_calls(text: str, plan: ToolPlan) -> ParsedOutput | None:
    """`<tool_call>` blocks and the text around them; None when a block does not parse (the
    last block may lack its closing marker: the output ended there)."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return None
    outside = [text[:start]]
    calls: list[ToolCall] = []
    pos = start
    while pos >= 0:
        body_start = pos + len(CALL_OPEN)
        end = text.find(CALL_CLOSE, body_start)
        body = text[body_start:] if end < 0 else text[body_start:end]
        try:
            found = _calls_of(json.loads(body), plan)
        except ValueError:
            return None
        if found is None:
            return None
        calls += found
        if end < 0:
            break
        after = end + len(CALL_CLOSE)
        pos = text.find(CALL_OPEN, after)
        outside.append(text[after:] if pos < 0 else text[after:pos])
    return ParsedOutput(_content("".join(outside)), tuple(calls))


def _content(text: str) -> str | None:
    return text if text.strip() else None


def parse_output(text: str, plan: ToolPlan) -> ParsedOutput:
    """A choice's whole output text -> content and calls. Without parsing (tool_choice none,
    no tools), or when nothing in it is a complete call, the text is all content. Forced
    choices are parsed as bare JSON first (what the constraint makes the output), then as
    marked blocks; with parallel_tool_calls false only the first call is kept, as vLLM does."""
    if not plan.parses:
        return ParsedOutput(text)
    parsed = None
    if plan.forced:
        try:
            calls = _calls_of(json.loads(text), plan)
        except ValueError:
            calls = None
        if calls:
            parsed = ParsedOutput(None, tuple(calls))
    if parsed is None:
        parsed = _marked_calls(text, plan)
    if parsed is None or not parsed.calls:
        return ParsedOutput(text)
    if not plan.parallel:
        parsed = ParsedOutput(parsed.content, parsed.calls[:1])
    return parsed


def finish_reason(reason: str | None, parsed: ParsedOutput) -> str | None:
    """OpenAI's finish_reason: `tool_calls` when the output ended by itself with calls."""
    return "tool_calls" if parsed.calls and reason == "stop" else reason


class ToolStream:
    """One streamed choice's text with its calls held back: content flows until a call marker
    appears (text that may be the start of one waits), then everything is held until the
    output ends and parsed whole, so the calls come out complete (as deltas: the id, type and
    name first, then the arguments) or, when they do not parse, as the content they were.
    A forced choice (whose output is the call's JSON) holds everything from the start."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.sent = ""  # content already given out
        self.held = ""
        self.holding = plan.forced

    def push(self, text: str) -> str:
        """New output text -> the content that may be sent now."""
        self.held += text
        if self.holding:
            return ""
        at = self.held.find(CALL_OPEN)
        if at >= 0:
            out, self.held, self.holding = self.held[:at], self.held[at:], True
        else:
            keep = _partial_marker(self.held)
            out = self.held[: len(self.held) - keep]
            self.held = self.held[len(self.held) - keep :]
        self.sent += out
        return out

    def finish(self) -> ParsedOutput:
        """At the output's end: what remains to send, as content and calls (the content
        already sent is not repeated). The same calls `parse_output` finds in the whole text."""
        rest, self.held = self.held, ""
        parsed = parse_output(self.sent + rest, self.plan)
        if not parsed.calls:
            return ParsedOutput(rest or None)
        if not self.sent:
            return parsed
        # Content before the first call has been sent; what lies between and after the calls
        # comes now.
        return ParsedOutput(_tail_after_calls(rest), parsed.calls)


def _tail_after_calls(held: str) -> str | None:
    """Text between and after the call blocks of the held part (what the whole-text parse
    counted as content besides what came before the first block)."""
    pieces = []
    pos = held.find(CALL_OPEN)
    while pos >= 0:
        end = held.find(CALL_CLOSE, pos)
        if end < 0:
            break
        after = end + len(CALL_CLOSE)
        pos = held.find(CALL_OPEN, after)
        pieces.append(held[after:] if pos < 0 else held[after:pos])
    text = "".join(pieces)
    return text if text.strip() else None


def _partial_marker(text: str) -> int:
    """The length of the longest end of `text` that begins the call marker."""
    for k in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-k:]):
            return k
    return 0
