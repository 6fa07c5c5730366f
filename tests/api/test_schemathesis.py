"""Property-based fuzzing of the live server from its own OpenAPI document, with schemathesis.

Proves that no request schemathesis derives from /openapi.json, valid (positive) or invalid
(negative), gets a 5xx, and that every 4xx comes in OpenAI's error envelope. Bounded: a fixed
number of examples per operation and mode, no shrinking or example database, and a tenant whose
tier allows 4 output tokens, so valid bodies are cheap to serve.
"""

from __future__ import annotations

import copy

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.api.live import MODEL, LiveServer

EXAMPLES = 25  # per operation and generation mode


def test_no_server_errors(server: LiveServer) -> None:
    headers = server.headers("fuzz")
    doc = httpx.get(server.base_url + "/openapi.json", headers=headers)
    assert doc.status_code == 200
    spec = doc.json()
    # `model` is any non-empty string to the schema, but only the base model and its subnets
    # exist: random names would all stop at the 404, so valid cases name real models (invalid
    # ones still mutate the field).
    # vLLM's four guided_* fields are left out: a request may carry at most one constraint, and
    # random regexes and grammars rarely compile, so with them nearly every valid-by-schema body
    # is a 400 and the 200 path goes unexercised (tests/api/test_structured_output.py covers them;
    # response_format stays, so constraints are still fuzzed).
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = spec["components"]["schemas"][name]["properties"]
        properties["model"] = {
            "type": "string",
            "enum": [MODEL, "e2b", "e2.98b-layer", "full"],
        }
        for field in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            properties.pop(field)
        # max_tokens: the fuzz tier allows 4, completions' default (16) is more, and 0 is valid
        # only with echo (which the schema cannot say): valid cases ask for 1 to 4, or most stop
        # at that 400 and the 200 path goes unexercised.
        properties["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": 4}
        spec["components"]["schemas"][name].setdefault("required", []).append("max_tokens")
    # Fuzzed bodies of these routes rarely get everything right at once (alternating roles, tool
    # call ids that match, arguments that are JSON, ...), and which cases are generated depends
    # on the whole document. So each route also carries one valid example, which the explicit
    # phase sends: the 200 path is always exercised, whatever the fuzzer draws.
    examples = {
        "/v1/chat/completions": {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        },
        "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    }
    for path, example in examples.items():
        spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"] = (
            example
        )
    # A tool history is valid only when its call ids match up and its arguments are JSON, and
    # tool_choice only with tools, which no schema says: with them, valid-by-schema chat bodies
    # are nearly all 400s. So the document is fuzzed as it is, and once more as a plain chat
    # (no tool fields) whose valid cases are served.
    plain = copy.deepcopy(spec)
    components = plain["components"]["schemas"]
    components["ChatMessage"]["oneOf"] = [
        v for v in components["ChatMessage"]["oneOf"] if set(v["required"]) == {"role", "content"}
    ]
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        del components["ChatCompletionRequest"]["properties"][name]
    failures: list[str] = []
    seen: dict[str, set[int]] = {}

    operations = [
        result.ok()
        for document in (spec, plain)
        for result in schemathesis.openapi.from_dict(document).get_all_operations()
    ]
    for operation in operations:
        # Invalid data needs something to make invalid: negative cases for operations with a
        # body or parameters (the probes and /v1/models take none).
        has_input = any(len(part) for part in (operation.body, operation.query, operation.headers))
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_input else [])
        for mode in modes:

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same cases every run: a failure reproduces
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: schemathesis.Case) -> None:
                response = case.call(base_url=server.base_url, headers=headers, timeout=60)
                status = response.status_code
                seen.setdefault(case.operation.label, set()).add(status)
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                    if 400 <= status < 500:
                        error = response.json()["error"]
                        assert set(error) == {"message", "type", "param", "code"}
                except Exception as e:  # collect all; one report at the end
                    failures.append(f"{status} {type(e).__name__}: {case.as_curl_command()}")

            fuzz()

    assert not failures, "\n".join(failures[:20])
    # The generated requests reached the handlers: both outcomes were seen on the POST routes.
    for route in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert 200 in seen[route] and 400 in seen[route], (route, seen[route])
    assert httpx.get(server.base_url + "/health").status_code == 200
