"""OpenAI wire types for requests: chat completions, completions, tokenize and detokenize.

Owns what a request may contain. Models are strict: unknown parameters are rejected (by name, as
unsupported; never silently ignored), and values of the wrong JSON type are errors rather than
being coerced. The extras vLLM accepts in the body (top_k, min_p, repetition_penalty,
stop_token_ids, min_tokens, prompt_logprobs) are accepted here too. Responses are built as plain
dicts by the route handlers.

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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
        return {k: v for k, v in data.items() if k not in dropped} if dropped else data


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # One plain message for every wrong shape (null, an image part, a number), rather than
        # pydantic's per-branch paths (messages.0.content.str, ...list[TextPart].0.type).
        def is_text_part(p: Any) -> bool:
            return (
                isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
                and set(p) == {"type", "text"}
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
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool = True  # random padding against length side channels: not sent


class Prediction(Strict):
    """Predicted output (OpenAI): a latency hint only; the output is the same without it."""

    type: Literal["content"]
    content: str | list[TextPart]


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
