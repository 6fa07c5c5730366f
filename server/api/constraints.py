"""The structured-output constraint a request asks for, from its HTTP fields.

Owns the mapping from OpenAI's `response_format` and vLLM's `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar` to one `StructuredOutput`, the rule that a request carries
at most one constraint (a 400 naming the fields), and the shape checks that name the field the
client used. Whether a schema, pattern or grammar compiles is checked later, off the event loop,
by `compile_constraint`, off the event loop before admission; its error names the same field.

Deliberately does not know: grammar engines, tokenizers or sampling. Plain Python (no torch).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from server.api.errors import APIError
from server.vocabulary.sampling_params import SamplingParamsError, validate_structured
from server.vocabulary.structured_output import StructuredOutput

if TYPE_CHECKING:  # the service brings the runtime (torch); this module only calls it
    from server.api.service import Service

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def requested_constraint(body: Any) -> tuple[StructuredOutput, str] | None:
    """The request's constraint and the field that asked for it; None when its output is free.

    `{"type": "text"}` is no constraint. A json_schema without `schema` is any JSON object (the
    OpenAI API requires one; vLLM does the same). `strict` is accepted and not needed: the
    output always matches the schema."""
    asked: list[tuple[StructuredOutput, str]] = []
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type == "json_object":
        asked.append((StructuredOutput("json"), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_
        if schema is None:
            asked.append((StructuredOutput("json"), "response_format"))
        else:
            asked.append((StructuredOutput("json_schema", _dumps(schema)), "response_format"))
    g = getattr(body, "guided_json", None)
    if g is not None:
        text = g if isinstance(g, str) else _dumps(g)
        asked.append((StructuredOutput("json_schema", text), "guided_json"))
    if getattr(body, "guided_regex", None) is not None:
        asked.append((StructuredOutput("regex", body.guided_regex), "guided_regex"))
    if getattr(body, "guided_choice", None) is not None:
        asked.append((StructuredOutput("choice", _dumps(body.guided_choice)), "guided_choice"))
    if getattr(body, "guided_grammar", None) is not None:
        asked.append((StructuredOutput("grammar", body.guided_grammar), "guided_grammar"))
    if not asked:
        return None
    if len(asked) > 1:
        fields = ", ".join(f for _, f in asked)
        raise APIError(
            400,
            f"at most one structured-output constraint per request; got {fields}",
            param=asked[1][1],
        )
    structured, field = asked[0]
    try:
        validate_structured(structured)
    except SamplingParamsError as e:
        raise APIError(400, f"{field}: {e.message}", param=field, code="invalid_value") from None
    return structured, field


async def compile_constraint(
    svc: Service, tenant: str, asked: tuple[StructuredOutput, str] | None
) -> None:
    """Compile a request's constraint (`asked`: it and the field that asked for it; None: no
    constraint) before admission, in the tokenizing pool under the tenant's share: it can take a
    few hundred milliseconds at a real vocabulary, so never on the event loop. The compiled
    grammar is cached for the engine's step (runtime/grammar.py). One that does not compile is a
    400 naming the field. Any caller that builds a constraint itself (e.g. a tool call made
    compulsory) passes it here the same way before submitting."""
    if asked is None:
        return
    # Here, not at the top: the grammar module brings torch, and this module stays plain.
    from server.runtime.grammar import GrammarError

    structured, field = asked
    grammars = svc.runtime.grammars  # type: ignore[union-attr]
    try:
        await svc.prompts.run(tenant, lambda: grammars.compile(structured))  # type: ignore[union-attr]
    except GrammarError as e:
        raise APIError(400, f"{field}: {e}", param=field, code="invalid_value") from None


def _dumps(value: Any) -> str:
    # Compact, keys in the client's order (a schema's property order is the output's order):
    # the same schema sent again gives the same text, so it reuses its compiled grammar.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
