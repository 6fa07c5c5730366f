"""The trained dev model behind the live API: `/v1/models` reports each subnet's measured held-out
quality (not the borrowed MMLU), and a chat question gets an answer that ends its turn."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from server.tools.dev_model import TRAINED_CHECKPOINT
from tests.api.live import LiveServer, start_server


@pytest.fixture(scope="module")
def trained_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # float32 compute over the bf16 weights, as the quality was measured.
    live = start_server(tmp_path_factory.mktemp("trained"), TRAINED_CHECKPOINT, dtype="float32")
    try:
        yield live
    finally:
        live.stop()


def test_models_carry_the_measured_quality(trained_server: LiveServer):
    stored = json.loads((TRAINED_CHECKPOINT / "subnet_quality.json").read_text())["subnets"]
    with trained_server.client() as c:
        models = c.get("/v1/models").json()["data"]
    subnets = {m["id"]: m["concentric"] for m in models[1:]}
    assert set(subnets) == set(stored)
    for name, extra in subnets.items():
        assert extra["quality_source"] == "measured"
        assert extra["heldout_perplexity"] == stored[name]["perplexity"]
        assert extra["quality"] == pytest.approx(100 / stored[name]["perplexity"])


def test_a_chat_question_gets_an_answer_that_ends_its_turn(trained_server: LiveServer):
    # Greedy, so the answer is the checkpoint's: the chat share taught it to answer a definition
    # question and stop (finish_reason "stop", from <end_of_turn>) well within 64 tokens.
    client = trained_server.openai()
    r = client.chat.completions.create(
        model="full",
        messages=[{"role": "user", "content": 'What does "river" mean?'}],
        max_tokens=64,
        temperature=0.0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.strip()
