"""OpenAI wire types for requests: chat completions, completions, tokenize and detokenize.

Owns what a request may contain. Models are strict: unknown parameters are rejected (by name, as
unsupported; never silently ignored), and values of the wrong JSON type are errors rather than
being coerced. The extras vLLM accepts in the body (top_k, min_p, repetition_penalty,
stop_token_ids, min_tokens, prompt_logprobs, guided_json / guided_regex / guided_choice /
guided_grammar) are accepted here too, and `response_format` on both endpoints, as vLLM accepts
it. Responses are built as plain dicts by the route handlers.

Lenient where nothing visible changes: `null` for an optional field means its default (OpenAI's
clients send nulls), and fields that mean nothing to this server are accepted and ignored:
`store`, `metadata`, `service_tier`, `user`, `reasoning_effort` (not a reasoning model),
`prediction` (a latency hint: the output is the same), `modalities: ["text"]`,
`stream_options.include_obfuscation`. What would change the output and is not supported
(`modalities` with "audio", `audio`, `suffix`) is refused by name.

Deliberately does not know: tokenizers, tenants, or the engine.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # `null` for an optional field is its default (clients send `"n": null`); a required
        # field stays required, and a field that takes null itself keeps its meaning (a null
        # completions max_tokens is "up to the context", as vLLM).
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        dropped = [
            k
            for k, v in data.items()
            if v is None
            and k in fields
            and not fields[k].is_required()
            and type(None) not in get_args(fields[k].annotation)
        ]
        data = {k: v for k, v in data.items() if k not in dropped} if dropped else data
        # JSON has one number type, and JSON Schema's "integer" (what /openapi.json says)
        # admits 2.0: a whole float given for an integer field is that integer, as vLLM and
        # OpenAI take it; 2.5, "2" and true still fail as not an integer.
        whole = {
            k: _whole(v, fields[k].annotation)
            for k, v in data.items()
            if k in fields and _takes_int(fields[k].annotation)
        }
        return {**data, **whole} if whole else data


def _takes_int(annotation: Any) -> bool:
    """An int field, or a list of ints (optional or not)."""
    options = (annotation, *get_args(annotation))
    return int in options or list[int] in options


def _whole(value: Any, annotation: Any) -> Any:
    def one(v: Any) -> Any:
        return int(v) if isinstance(v, float) and v.is_integer() else v

    if isinstance(value, list) and list[int] in (annotation, *get_args(annotation)):
        return [one(v) for v in value]
    return one(value)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallItem(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


def _message_shapes(schema: dict[str, Any]) -> None:
    """The JSON schema of a message, by role (as OpenAI's own document has it), so clients and
    fuzzers see what the checks below accept: content required except for an assistant's
    calls, tool_calls only from an assistant, tool_call_id exactly on tool messages."""
    props = schema["properties"]

    def text(p: dict[str, Any]) -> dict[str, Any]:
        return {**p, "anyOf": [b for b in p["anyOf"] if b.get("type") != "null"]}

    def shape(roles: list[str], required: list[str], **fields: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "role": {"type": "string", "enum": roles},
                "name": props["name"],
                **fields,
            },
            "required": ["role", *required],
        }

    calls = {**text(props["tool_calls"])}
    calls["anyOf"] = [{**calls["anyOf"][0], "minItems": 1}]
    variants = [
        shape(["system", "developer", "user"], ["content"], content=text(props["content"])),
        shape(["assistant"], ["content"], content=text(props["content"])),
        shape(["assistant"], ["tool_calls"], content=props["content"], tool_calls=calls),
        shape(
            ["tool"],
            ["content", "tool_call_id"],
            content=text(props["content"]),
            tool_call_id=text(props["tool_call_id"]),
        ),
    ]
    title = schema.get("title")
    schema.clear()
    schema.update(title=title, oneOf=variants)


class ChatMessage(Strict):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_message_shapes)
    # Declared in this order so each check below sees the fields before it (role first).
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # assistant messages
    tool_call_id: str | None = Field(None, validate_default=True)  # tool messages
    content: str | list[TextPart] | None = Field(None, validate_default=True)

    @field_validator("tool_calls")
    @classmethod
    def _calls_by_assistants(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message may have tool_calls")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_messages_answer_a_call(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if role == "tool" and value is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if role != "tool" and value is not None:
            raise ValueError("only a tool message has a tool_call_id")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any, info: ValidationInfo) -> Any:
        # One plain message for every wrong shape (null, an image part, a number), rather than
        # pydantic's per-branch paths (messages.0.content.str, ...list[TextPart].0.type).
        def is_text_part(p: Any) -> bool:
            return (
                isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
                and set(p) == {"type", "text"}
            )

        if value is None:
            # As OpenAI: only an assistant message that calls tools may leave content out.
            if info.data.get("role") == "assistant" and info.data.get("tool_calls"):
                return value
            raise ValueError(
                "missing: a message needs content, a string or a list of text parts (only an "
                "assistant message with tool_calls may leave it out); this server accepts text "
                "only"
            )
        if isinstance(value, str) or (
            isinstance(value, list) and all(is_text_part(p) for p in value)
        ):
            return value
        raise ValueError(
            'must be a string or a list of text parts ({"type": "text", "text": "..."}); '
            "this server accepts text only"
        )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDefinition(Strict):
    # The schema shows the rules tool_calls.plan_of enforces (with messages that say why).
    name: str = Field(json_schema_extra={"pattern": "^[A-Za-z0-9_-]{1,64}$"})
    description: str | None = None
    parameters: dict[str, Any] | None = Field(  # a JSON schema of an object
        None,
        json_schema_extra={
            "properties": {"type": {"const": "object"}, "properties": {"type": "object"}}
        },
    )
    strict: bool | None = None


class ToolDefinition(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool = True  # random padding against length side channels: not sent


class Prediction(Strict):
    """Predicted output (OpenAI): a latency hint only; the output is the same without it."""

    type: Literal["content"]
    content: str | list[TextPart]


class JsonSchemaFormat(Strict):
    """OpenAI's `response_format.json_schema`. `schema` is a reserved name on pydantic models,
    hence the alias."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    {...}}` (server/api/constraints.py turns it into the constraint)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs the json_schema field')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(
                f'json_schema is only allowed with type "json_schema", not {self.type!r}'
            )
        return self


class SamplingFields(Strict):
    """Parameters both endpoints share."""

    model: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted and ignored: they change nothing this server returns.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    # Only text out; anything else (audio) would change the output: refused by name.
    modalities: list[Literal["text"]] | None = None

    @field_validator("modalities", mode="before")
    @classmethod
    def _text_out_only(cls, value: Any) -> Any:
        # One message naming the field (not pydantic's modalities.0 literal error).
        if isinstance(value, list) and any(m != "text" for m in value):
            raise ValueError('this server outputs text only: modalities may only be ["text"]')
        return value

    # vLLM's extras
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = Field(None, ge=0)
    # Structured output: OpenAI's response_format, and vLLM's guided_* extras (at most one
    # constraint per request; server/api/constraints.py)
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: the prompt tokens' logprobs (None first, then the top k and the prompt's token).
    prompt_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def conflict(self) -> tuple[str, str] | None:
        """(parameter, why) for a combination this server refuses, else None; the route turns
        it into a 400 naming the parameter (a model validator cannot name one)."""
        if self.prompt_logprobs is not None and self.stream:
            # As vLLM: prompt logprobs come in the complete response only.
            return "prompt_logprobs", "prompt_logprobs is not available when stream is true"
        return None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Tool calls (server/api/tool_calls.py checks what the types cannot).
    tools: list[ToolDefinition] | None = Field(None, json_schema_extra={"minItems": 1})
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        # One message naming tool_choice, rather than pydantic's per-branch paths.
        named = (
            isinstance(value, dict)
            and set(value) == {"type", "function"}
            and value["type"] == "function"
            and isinstance(value["function"], dict)
            and set(value["function"]) == {"name"}
            and isinstance(value["function"]["name"], str)
        )
        if value is None or value in ("none", "auto", "required") or named:
            return value
        raise ValueError(
            'must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": "..."}}'
        )

    prediction: Prediction | None = None  # accepted and ignored (see the module docstring)

    @model_validator(mode="after")
    def _consistent(self):
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo: the prompt is scored and nothing is generated (as vLLM).
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def conflict(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and not self.echo:
            # vLLM refuses it too ("max_tokens must be at least 1"): without echo there is
            # nothing to return.
            return "max_tokens", "max_tokens 0 is only allowed with echo (to score the prompt)"
        return super().conflict()

    @property
    def score_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) is the whole answer."""
        return self.echo and self.max_tokens == 0

    @model_validator(mode="after")
    def _supported(self):
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    @property
    def output_limit(self) -> int | None:
        # Scoring the prompt still runs one step, whose token is dropped (as vLLM does).
        return 1 if self.score_only else self.max_tokens


# ---- tokenize / detokenize (vLLM's shapes) -----------------------------------------------------


class TokenizePromptRequest(Strict):
    model: str | None = None  # optional, as vLLM; when given it must be one the tenant may use
    prompt: str
    add_special_tokens: bool = True  # the BOS a completions prompt gets
    return_token_strs: bool = False


class TokenizeChatRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    # False, as vLLM: the chat template writes the BOS itself (True adds one more, as vLLM).
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]
