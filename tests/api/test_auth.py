"""Authentication, authorisation and tenant isolation on a live server.

Proves: every route but the probes (and /metrics, configured open) needs a key, including
/v1/models, the OpenAPI document, the docs and unknown paths; a missing or wrong key is 401, and a
tenant pinning a subnet its tier does not allow is 403, both in OpenAI's error envelope (and as
the official client's exception types); and concurrent greedy streams of two tenants on different
subnets and prompts each get exactly what they get alone.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from tests.api.live import MODEL, LiveServer, error_of, reference, text_of

if TYPE_CHECKING:
    from server.runtime.elastic import ElasticRuntime

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
GUARDED = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/tokenizer_info"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/no/such/path"),
    ("DELETE", "/v1/models"),
]


@pytest.mark.parametrize(("method", "path"), GUARDED)
def test_no_key_or_bad_key_is_401(server: LiveServer, method: str, path: str) -> None:
    body = CHAT if method == "POST" else None
    for headers, fragment in (
        ({}, "missing API key"),
        ({"Authorization": "Bearer sk-not-a-key"}, "invalid API key"),
        ({"Authorization": f"Basic {server.keys['alice']}"}, "invalid API key"),  # not Bearer
        ({"Authorization": "Bearer"}, "invalid API key"),  # no token
    ):
        r = httpx.request(method, server.base_url + path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        err = error_of(r)
        assert fragment in err["message"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"


def test_probes_and_metrics_are_open(server: LiveServer) -> None:
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.base_url + "/ready")
    assert ready.status_code == 200 and ready.json()["model"] == MODEL
    metrics = httpx.get(server.base_url + "/metrics")
    assert metrics.status_code == 200 and "concentric_engine_up 1.0" in metrics.text


def test_a_key_opens_the_guarded_routes(server: LiveServer) -> None:
    with server.client() as c:
        assert c.get("/v1/models").status_code == 200
        doc = c.get("/openapi.json")
        assert doc.status_code == 200 and "/v1/chat/completions" in doc.json()["paths"]
        assert c.get("/docs").status_code == 200
        missing = c.get("/no/such/path")
        assert missing.status_code == 404
        assert error_of(missing)["type"] == "not_found_error"
        wrong = c.delete("/v1/models")
        assert wrong.status_code == 405
        assert "method not allowed" in error_of(wrong)["message"]


def test_openai_client_sees_401(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(**CHAT)
    assert info.value.status_code == 401
    assert info.value.body["message"] == "invalid API key"  # the envelope's inner object


def test_tier_may_not_pin_that_subnet_403(server: LiveServer) -> None:
    bob = server.openai("bob")  # tier "restricted": may pin e2b only
    with pytest.raises(openai.PermissionDeniedError) as info:
        bob.chat.completions.create(**{**CHAT, "model": "e2.98b-layer"})
    err = info.value.body
    assert info.value.status_code == 403
    assert err["type"] == "permission_error" and err["param"] == "model"
    assert err["code"] == "subnet_not_allowed"
    assert "'restricted'" in err["message"] and "e2.98b-layer" in err["message"]
    # The subnet its tier allows, and the base model (the server's choice), are served.
    ok = bob.chat.completions.with_raw_response.create(**{**CHAT, "model": "e2b"})
    assert ok.headers["x-concentric-subnet"] == "e2b"
    assert bob.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")
    # The same request from a premium tenant is allowed.
    alice = server.openai("alice")
    pinned = alice.chat.completions.create(**{**CHAT, "model": "e2.98b-layer"})
    assert pinned.system_fingerprint == "concentric:e2.98b-layer"


def test_concurrent_streams_of_two_tenants_never_mix(
    server: LiveServer, rt: ElasticRuntime
) -> None:
    # (tenant, subnet, prompt): two tenants, different subnets and prompts, all at once.
    jobs = [
        ("alice", "e2.98b-layer", "Write about the sea."),
        ("bob", "e2b", "List three colours."),
        ("alice", "full", "Count to ten."),
        ("bob", "e2b", "Name a dog."),
    ]
    results: dict[int, tuple[str, set[str]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(i: int, tenant: str, subnet: str, prompt: str) -> None:
        try:
            client = server.openai(tenant)
            start.wait()
            stream = client.chat.completions.create(
                model=subnet,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=16,
                temperature=0,
                stream=True,
            )
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            results[i] = (text, {c.system_fingerprint for c in chunks})
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (_, subnet, prompt) in enumerate(jobs):
        ids = rt.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        alone = text_of(rt, reference(rt, subnet, ids, 16).tokens)
        text, fingerprints = results[i]
        assert text == alone, (subnet, prompt)
        assert fingerprints == {f"concentric:{subnet}"}
    # The answers differ from each other, so a mix-up could not go unnoticed.
    assert len({text for text, _ in results.values()}) == len(jobs)
