"""The official `openai` client against a live server, every answer checked on its content.

Proves, with the in-process runtime as the reference for the same prompt ids and subnet: greedy
chat and completions give the runtime's tokens (text, per-token strings, usage counts, finish
reason); a pinned subnet is the one that answers (`system_fingerprint`, `x-concentric-subnet`,
and its tokens); streamed chat equals the non-streamed answer and ends with the usage chunk;
`n=2` with a seed gives two different choices that reproduce; a stop string ends the text right
before its first occurrence; logprobs are the runtime's log-probabilities (up to float32 rounding,
measured against float64: tests/runtime/conftest.py) with top-k lists sorted and of the requested
size; sampling fields a request leaves unset take the checkpoint's generation_config defaults;
`/v1/models` lists the base model and every subnet, with the defaults in force.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.api.live import MODEL, LiveServer, Reference, reference, text_of, token_text

if TYPE_CHECKING:
    from server.runtime.elastic import ElasticRuntime

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "Tell me about nested models."}]
PROMPT = "Matryoshka dolls nest inside each other"


def _finish(ref: Reference, rt: ElasticRuntime) -> str:
    return "stop" if ref.tokens and ref.tokens[-1] in rt.tokenizer.stop_ids else "length"


@pytest.mark.parametrize("subnet", ["e2b", "e2.98b-layer", "skip-3-7"])
def test_pinned_greedy_chat_is_the_runtimes_answer(
    server: LiveServer, rt: ElasticRuntime, rt64: ElasticRuntime, subnet: str
) -> None:
    client = server.openai()
    raw = client.chat.completions.with_raw_response.create(
        model=subnet,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    resp = raw.parse()
    assert raw.headers["x-concentric-subnet"] == subnet
    assert resp.system_fingerprint == f"concentric:{subnet}"
    assert resp.model == subnet

    prompt_ids = rt.tokenizer.encode_chat(MESSAGES)
    ref = reference(rt, subnet, prompt_ids, 12, k=3, rt64=rt64)
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == text_of(rt, ref.tokens)
    assert choice.finish_reason == _finish(ref, rt)
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(ref.tokens)
    assert resp.usage.total_tokens == len(prompt_ids) + len(ref.tokens)

    # One logprob entry per generated token: the same tokens, with the runtime's numbers.
    entries = choice.logprobs.content
    assert [e.token for e in entries] == [token_text(rt, t) for t in ref.tokens]
    for step, entry in enumerate(entries):
        assert entry.logprob <= 0
        assert entry.logprob == pytest.approx(ref.logprobs[step], abs=ref.logprob_bound)
        # A byte-fallback token (<0xE4>) reports its one raw byte; others their text's UTF-8.
        piece = rt.tokenizer.hf.convert_ids_to_tokens(ref.tokens[step])
        raw = [int(piece[3:5], 16)] if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else None
        assert entry.bytes == (raw if raw is not None else list(entry.token.encode()))
        top = entry.top_logprobs
        assert len(top) == 3
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert [t.token for t in top] == [token_text(rt, i) for i, _ in ref.top[step]]
        assert values == pytest.approx([v for _, v in ref.top[step]], abs=ref.logprob_bound)
        assert entry.logprob == values[0]  # greedy: the top token, the same number twice


def test_base_model_is_served_by_the_policys_choice(server: LiveServer, rt: ElasticRuntime) -> None:
    # The base model name leaves the choice to the server's subnet policy (sla). For a tier
    # with no latency targets and every subnet allowed, on an idle server, that is the
    # highest-quality subnet of the table (MMLU 63.4: e3.59b-layer, the smaller of the two).
    raw = server.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    resp = raw.parse()
    chosen = raw.headers["x-concentric-subnet"]
    assert chosen == "e3.59b-layer"
    assert resp.system_fingerprint == f"concentric:{chosen}"
    ref = reference(rt, chosen, rt.tokenizer.encode_chat(MESSAGES), 8)
    assert resp.choices[0].message.content == text_of(rt, ref.tokens)


def test_streamed_chat_with_usage(server: LiveServer, rt: ElasticRuntime) -> None:
    client = server.openai()
    stream = client.chat.completions.create(
        model="e2b",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    prompt_ids = rt.tokenizer.encode_chat(MESSAGES)
    ref = reference(rt, "e2b", prompt_ids, 16)

    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == len(ref.tokens)
    assert last.usage.total_tokens == len(prompt_ids) + len(ref.tokens)
    assert all(c.usage is None for c in body)
    assert all(c.system_fingerprint == "concentric:e2b" for c in chunks)
    assert body[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == text_of(rt, ref.tokens)
    finishes = [c.choices[0].finish_reason for c in body]
    assert finishes[-1] == _finish(ref, rt) and set(finishes[:-1]) == {None}


def test_greedy_completions_text_and_token_prompt(
    server: LiveServer, rt: ElasticRuntime, rt64: ElasticRuntime
) -> None:
    client = server.openai()
    ids = rt.tokenizer.encode(PROMPT)
    ref = reference(rt, "e2.49b-block", ids, 10, k=4, rt64=rt64)
    for prompt in (PROMPT, ids):  # the text, and the same prompt as token ids
        raw = client.completions.with_raw_response.create(
            model="e2.49b-block", prompt=prompt, max_tokens=10, temperature=0, logprobs=4
        )
        resp = raw.parse()
        assert raw.headers["x-concentric-subnet"] == "e2.49b-block"
        assert resp.system_fingerprint == "concentric:e2.49b-block"
        (choice,) = resp.choices
        assert choice.text == text_of(rt, ref.tokens)
        assert choice.finish_reason == _finish(ref, rt)
        assert resp.usage.prompt_tokens == len(ids)
        assert resp.usage.completion_tokens == len(ref.tokens)

        lp = choice.logprobs
        assert lp.tokens == [token_text(rt, t) for t in ref.tokens]
        assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=ref.logprob_bound)
        assert all(v <= 0 for v in lp.token_logprobs)
        offsets = [0]
        for t in lp.tokens[:-1]:
            offsets.append(offsets[-1] + len(t))
        assert lp.text_offset == offsets
        for step, top in enumerate(lp.top_logprobs):
            # A dict keyed by token text: ids that read alike share an entry, which must keep
            # the most likely one's logprob; the entries stay sorted.
            expected: dict[str, float] = {}
            for i, v in ref.top[step]:
                expected.setdefault(token_text(rt, i), v)
            assert list(top) == list(expected)
            bound = ref.logprob_bound
            assert list(top.values()) == pytest.approx(list(expected.values()), abs=bound)
            assert list(top.values()) == sorted(top.values(), reverse=True)
            assert lp.token_logprobs[step] == max(top.values())  # the same number twice


def test_streamed_completion_logprobs_equal_the_whole(server: LiveServer) -> None:
    # Chunk by chunk, the logprobs add up to the non-streamed ones; text_offset keeps counting
    # from the start of the choice across chunks.
    client = server.openai()
    ask = {"model": "e2b", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**ask).choices[0]
    chunks = list(client.completions.create(**ask, stream=True))
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    offsets: list[int] = []
    for c in chunks:
        lp = c.choices[0].logprobs
        if lp is None:
            continue
        for key, values in joined.items():
            values.extend(getattr(lp, key))
        offsets.extend(lp.text_offset)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert joined["tokens"] == whole.logprobs.tokens
    assert joined["token_logprobs"] == whole.logprobs.token_logprobs
    assert joined["top_logprobs"] == whole.logprobs.top_logprobs
    assert offsets == whole.logprobs.text_offset


def test_n2_with_seed_reproduces(server: LiveServer, rt: ElasticRuntime) -> None:
    client = server.openai()

    def ask():
        return client.chat.completions.create(
            model="e2b", messages=MESSAGES, n=2, seed=1234, temperature=1.0, max_tokens=12
        )

    first, second = ask(), ask()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in second.choices]
    # Choice i draws with seed + i: the two differ (random weights at temperature 1: two equal
    # 12-token samples would be a broken seed).
    assert texts[0] != texts[1]
    # The prompt is counted once; the completion tokens of both choices add up.
    assert first.usage.prompt_tokens == len(rt.tokenizer.encode_chat(MESSAGES))
    assert first.usage == second.usage
    assert 2 <= first.usage.completion_tokens <= 24
    other = client.chat.completions.create(
        model="e2b", messages=MESSAGES, n=2, seed=99, temperature=1.0, max_tokens=12
    )
    assert [c.message.content for c in other.choices] != texts


def test_unset_sampling_fields_take_the_checkpoints_defaults(server: LiveServer) -> None:
    # The dev checkpoint's generation_config.json sets top_k 64 and top_p 0.95, as Gemma 3n's
    # does. A seeded request that leaves them unset draws exactly what one that sends them
    # draws, and not what one that turns them off draws (16 tokens from a random-weight model:
    # the filters change the draw).
    client = server.openai()

    def draw(**extra) -> tuple[str, list[float]]:
        out = client.completions.create(
            model="e2b", prompt=PROMPT, max_tokens=16, seed=7, logprobs=0, extra_body=extra
        )
        # The text and each chosen token's log-probability identify the tokens drawn.
        return out.choices[0].text, out.choices[0].logprobs.token_logprobs

    unset = draw()
    assert unset == draw(top_k=64, top_p=0.95)
    assert unset != draw(top_k=0, top_p=1.0)


def test_stop_string_ends_the_text_before_it(server: LiveServer, rt: ElasticRuntime) -> None:
    client = server.openai()
    ids = rt.tokenizer.encode(PROMPT)
    full = client.completions.create(model="e2b", prompt=ids, max_tokens=32, temperature=0).choices[
        0
    ]
    text = full.text
    assert text == text_of(rt, reference(rt, "e2b", ids, 32).tokens)
    # A stop string taken from the middle of the greedy text (clean characters only, so it is
    # whole in the text whatever the token boundaries).
    candidates = [
        text[i : i + 2]
        for i in range(2, len(text) - 1)
        if all(ch.isprintable() and ch != "\ufffd" for ch in text[i : i + 2])
    ]
    assert candidates, f"no usable stop string in {text!r}"
    stop = candidates[len(candidates) // 2]
    expected = text[: text.index(stop)]

    cut = client.completions.create(
        model="e2b", prompt=ids, max_tokens=32, temperature=0, stop=[stop, "\u2603never"]
    ).choices[0]
    assert cut.text == expected and stop not in cut.text
    assert cut.finish_reason == "stop"
    assert cut.model_extra.get("stop_reason") == stop

    streamed = client.completions.create(
        model="e2b", prompt=ids, max_tokens=32, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_list_base_and_every_subnet(server: LiveServer, rt: ElasticRuntime) -> None:
    models = server.openai().models.list().data
    ids = [m.id for m in models]
    assert ids[0] == MODEL
    assert ids[1:] == list(rt.subnets.names())
    base = models[0]
    assert base.owned_by == "concentric"
    defaults = base.model_extra["concentric"]["sampling_defaults"]
    assert defaults["source"] == "generation_config.json"
    assert (defaults["top_k"], defaults["top_p"], defaults["temperature"]) == (64, 0.95, 1.0)
    assert all(m.model_extra["concentric"]["sampling_defaults"] == defaults for m in models)
    assert base.model_extra["max_model_len"] == 512
    assert base.model_extra["parent"] is None
    for m in models[1:]:
        subnet = rt.subnets[m.id]
        assert m.model_extra["parent"] == MODEL
        extra = m.model_extra["concentric"]
        assert extra["effective_params"] == subnet.effective_params > 0
        assert extra["quality"] == subnet.quality
        assert extra["layers"] == len(subnet.layers)
    # The official table's rows carry their MMLU score; full is the largest subnet.
    by_id = {m.id: m.model_extra["concentric"] for m in models[1:]}
    assert by_id["e2b"]["quality"] is not None
    assert by_id["full"]["effective_params"] == max(e["effective_params"] for e in by_id.values())


def test_the_cli_and_the_server_draw_the_same_tokens_for_a_seed(
    server: LiveServer, rt: ElasticRuntime, tiny_dir: Path
) -> None:
    # One generation path: `concentric generate` drives the serving engine, so a seed and the
    # same sampling parameters give the same tokens as the API (sampled, not greedy: the seeded
    # random stream must agree, not only the argmax). Every sampling field is explicit on both
    # sides, so defaults cannot differ.
    prompt, seed = "The harbor town wakes", 4321
    sampling = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "presence_penalty": 0.3}
    cli = subprocess.run(
        [
            sys.executable, "-m", "server", "generate", "--checkpoint", str(tiny_dir),
            "--subnet", "e2.98b-layer", "--prompt", prompt, "--max-tokens", "16",
            "--seed", str(seed), "--temperature", "0.9", "--top-p", "0.9", "--top-k", "40",
            "--presence-penalty", "0.3", "--json",
        ],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    ours = json.loads(cli.stdout.strip().splitlines()[-1])
    client = server.openai()
    resp = client.completions.create(
        model="e2.98b-layer",
        prompt=prompt,
        max_tokens=16,
        seed=seed,
        logprobs=0,
        extra_body={"top_k": sampling.pop("top_k")},
        **sampling,
    )
    (choice,) = resp.choices
    assert resp.usage.prompt_tokens == len(ours["prompt_token_ids"])
    assert choice.text == ours["text"]
    assert resp.usage.completion_tokens == len(ours["token_ids"])
    # The ids themselves, through the logprob entries' token strings.
    assert choice.logprobs.tokens == [token_text(rt, t) for t in ours["token_ids"]]
