"""What a request's output must match: the constraint, as data.

Owns the record a request carries when its output is constrained (OpenAI's `response_format`,
vLLM's `guided_*` extras, a tool call that `tool_choice` makes compulsory): which kind of
constraint and its text. The runtime compiles it with a grammar engine into per-step token masks.

Deliberately does not know: any grammar engine, tokens, or the HTTP field that asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["json", "json_schema", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """`kind`: json (any JSON object), json_schema (`spec` is the schema as JSON text), regex
    (`spec` is the pattern), choice (`spec` is a JSON array of the allowed strings), grammar
    (`spec` is an EBNF grammar)."""

    kind: Kind
    spec: str = ""
