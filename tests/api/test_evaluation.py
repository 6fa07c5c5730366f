"""What evaluation harnesses use, against a live server: echo, prompt logprobs, lenient fields,
/tokenize and /detokenize.

Proves: `echo` returns prompt + completion, with the prompt tokens' logprobs first (null for the
first token and its top_logprobs) equal to the in-process runtime's float64 forward over the
prompt (float32 bound measured against float64, as tests/runtime/conftest.py), `text_offset`
indexing the response text, streamed and whole alike; `max_tokens: 0` with echo scores the prompt
alone, with the same numbers; vLLM's `prompt_logprobs` shape on completions and chat; nulls and
accepted-and-ignored fields change nothing while what would change the output is a 400 naming
it; /tokenize gives the ids the server runs and /detokenize inverts it, with 4xx for bad ids,
keys and models; /tokenizer_info names the special tokens and the chat template.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from tests.api.live import LiveServer, error_of, token_text

if TYPE_CHECKING:
    from server.runtime.elastic import ElasticRuntime

PROMPT = "Matryoshka dolls nest inside each other, and the smallest one"
SUBNET = "e2b"


def prompt_reference(rt, rt64, subnet: str, ids: list[int]):
    """(float64 logprob of each prompt token from the second on, the bound for the server's
    float32 values: twice the logits' float32 error, measured against float64)."""
    import torch

    from tests.runtime.conftest import float32_bound, prefill_logits

    vocab = rt.store.text.vocab_size_per_layer_input
    # every position, the last too: the first generated token's logprob comes from it
    exact = prefill_logits(rt64, rt64.subnets[subnet], ids)[:, :vocab]
    measured = prefill_logits(rt, rt.subnets[subnet], ids)[:, :vocab]
    lp = torch.log_softmax(exact, dim=-1)
    want = [lp[p - 1, ids[p]].item() for p in range(1, len(ids))]
    return want, 2 * float32_bound(measured, exact)


def post(server: LiveServer, path: str, body: dict, tenant: str = "alice") -> httpx.Response:
    with server.client(tenant) as c:
        return c.post(path, json=body)


def test_echo_with_logprobs_is_the_prompt_then_the_completion(
    server: LiveServer, rt: ElasticRuntime, rt64: ElasticRuntime
) -> None:
    client = server.openai()
    ids = rt.tokenizer.encode(PROMPT)
    ask = {"model": SUBNET, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    plain = client.completions.create(prompt=PROMPT, **ask).choices[0]
    echoed = client.completions.create(prompt=PROMPT, echo=True, **ask).choices[0]
    assert echoed.text == PROMPT + plain.text
    lp = echoed.logprobs
    n = len(ids)
    assert lp.tokens == [token_text(rt, t) for t in ids] + plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want, bound = prompt_reference(rt, rt64, SUBNET, ids)
    # The generated part: the same tokens; the first one's logprob up to float32 rounding (its
    # row was computed in a step of another shape: every prompt row had logits).
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=bound)
    assert lp.token_logprobs[1:n] == pytest.approx(want, abs=bound)
    for top, value in zip(lp.top_logprobs[1:n], lp.token_logprobs[1:n], strict=True):
        assert len(top) <= 2 and max(top.values()) >= value - bound
    # text_offset indexes the response text: the BOS the server added takes no room
    assert lp.text_offset[0] == lp.text_offset[1] == 0
    for tok, off in zip(lp.tokens[1:], lp.text_offset[1:], strict=True):
        assert echoed.text[off : off + len(tok)] == tok
    # the same prompt as token ids echoes its decoded text, <bos> included, with the same scores
    by_ids = client.completions.create(prompt=ids, echo=True, **ask).choices[0]
    assert by_ids.text == rt.tokenizer.decode(ids, skip_special_tokens=False) + plain.text
    assert by_ids.logprobs.token_logprobs == lp.token_logprobs
    assert by_ids.logprobs.text_offset[:2] == [0, len("<bos>")]


def test_max_tokens_0_with_echo_scores_the_prompt_alone(server: LiveServer, rt) -> None:
    client = server.openai()
    ids = rt.tokenizer.encode(PROMPT)
    base = {"model": SUBNET, "prompt": PROMPT, "echo": True, "logprobs": 1, "temperature": 0}
    scored = client.completions.create(max_tokens=0, **base)
    (choice,) = scored.choices
    assert choice.text == PROMPT
    assert choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids)
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    longer = client.completions.create(max_tokens=3, **base).choices[0]
    assert longer.logprobs.token_logprobs[: len(ids)] == choice.logprobs.token_logprobs
    again = client.completions.create(max_tokens=0, **base).choices[0]
    assert again.logprobs.token_logprobs == choice.logprobs.token_logprobs  # the same scores
    # streamed: one chunk with the prompt, then the end
    chunks = list(client.completions.create(max_tokens=0, stream=True, **base))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT
    streamed = [
        v
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for v in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed == choice.logprobs.token_logprobs
    # without echo there is nothing to return: 400, as vLLM
    r = post(server, "/v1/completions", {"model": SUBNET, "prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"


def test_streamed_echo_equals_the_whole(server: LiveServer) -> None:
    client = server.openai()
    ask = {"model": SUBNET, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    ask.update(logprobs=1, echo=True, n=2)
    whole = client.completions.create(**ask)
    chunks = list(client.completions.create(**ask, stream=True))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == whole.choices[i].text
        assert whole.choices[i].text.startswith(PROMPT)  # n choices each echo the prompt
        joined = [v for c in mine if c.logprobs for v in c.logprobs.token_logprobs]
        assert joined == whole.choices[i].logprobs.token_logprobs
        offsets = [v for c in mine if c.logprobs for v in c.logprobs.text_offset]
        assert offsets == whole.choices[i].logprobs.text_offset


def test_prompt_logprobs_in_vllms_shape(server: LiveServer, rt, rt64) -> None:
    ids = rt.tokenizer.encode(PROMPT)
    body = {"model": SUBNET, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    r = post(server, "/v1/completions", {**body, "prompt_logprobs": 3})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    pl = choice["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    want, bound = prompt_reference(rt, rt64, SUBNET, ids)
    for p in range(1, len(ids)):
        entry = pl[p]
        mine = entry[str(ids[p])]
        assert mine["logprob"] == pytest.approx(want[p - 1], abs=bound)
        assert mine["decoded_token"] == token_text(rt, ids[p]) and mine["rank"] >= 1
        ranked = sorted((e["rank"], e["logprob"]) for k, e in entry.items() if k != str(ids[p]))
        assert 3 <= len(entry) <= 4  # the top 3, and the prompt's token if it is not among them
        assert [v for _, v in ranked] == sorted((v for _, v in ranked), reverse=True)
    assert choice["text"] and not choice["text"].startswith(PROMPT)  # no echo asked
    # chat: one list for the request, as vLLM
    chat = {"model": SUBNET, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = post(server, "/v1/chat/completions", {**chat, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    chat_ids = rt.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    pl = r.json()["prompt_logprobs"]
    assert len(pl) == len(chat_ids) and pl[0] is None
    assert all(list(e) == [str(t)] for e, t in zip(pl[1:], chat_ids[1:], strict=True))
    # not with stream (as vLLM)
    r = post(server, "/v1/completions", {**body, "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt_logprobs"
    r = post(server, "/v1/completions", {**body, "prompt_logprobs": 21})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt_logprobs"


def test_nulls_and_ignored_fields_change_nothing(server: LiveServer) -> None:
    client = server.openai()
    messages = [{"role": "user", "content": "Define river."}]
    ask = {"model": SUBNET, "messages": messages, "max_tokens": 5, "temperature": 0}
    plain = client.chat.completions.create(**ask).choices[0].message.content
    lenient = client.chat.completions.create(
        **ask,
        store=False,
        metadata={"run": "eval"},
        service_tier="auto",
        reasoning_effort="low",
        modalities=["text"],
        prediction={"type": "content", "content": "A river is"},
        user="evaluator",
    )
    assert lenient.choices[0].message.content == plain
    streamed = client.chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True, "include_obfuscation": False}
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain
    nulls = {"n": None, "stream": None, "logprobs": None, "top_logprobs": None, "seed": None}
    r = post(server, "/v1/chat/completions", {**ask, **nulls, "stream_options": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == plain
    completion = {"model": SUBNET, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    whole = post(server, "/v1/completions", completion).json()["choices"][0]["text"]
    nulls = {"n": None, "stream": None, "echo": None, "logprobs": None, "best_of": None}
    r = post(server, "/v1/completions", {**completion, **nulls, "suffix": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == whole


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"model": None}, "model"),
    ],
)
def test_what_would_change_the_output_is_refused_by_name(server, extra, param) -> None:
    body = {"model": SUBNET, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = post(server, "/v1/chat/completions", {**body, **extra})
    assert r.status_code == 400 and error_of(r)["param"] == param, r.text
    r = post(server, "/v1/completions", {"model": SUBNET, "prompt": "x", "suffix": "y"})
    assert r.status_code == 400


def test_tokenize_and_detokenize(server: LiveServer, rt) -> None:
    ids = rt.tokenizer.encode(PROMPT)
    r = post(server, "/tokenize", {"model": SUBNET, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None}
    bare = post(server, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == ids[1:]  # no BOS
    messages = [{"role": "user", "content": "Define <bos> river."}]
    chat = post(server, "/tokenize", {"model": SUBNET, "messages": messages}).json()
    assert chat["tokens"] == rt.tokenizer.encode_chat(messages)  # the ids chat would run
    no_prompt = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert no_prompt.json()["tokens"] == rt.tokenizer.encode_chat(messages, False)
    strs = post(server, "/tokenize", {"prompt": "a b", "return_token_strs": True}).json()
    assert len(strs["token_strs"]) == strs["count"]
    back = post(server, "/detokenize", {"model": SUBNET, "tokens": ids})
    assert back.status_code == 200 and back.json() == {"prompt": "<bos>" + PROMPT}
    with server.client() as c:
        info = c.get("/tokenizer_info").json()  # what lm-eval's remote tokenizer reads
    assert info["bos_token"] == rt.tokenizer.hf.bos_token == "<bos>"
    assert info["eos_token"] == rt.tokenizer.hf.eos_token
    assert info["chat_template"] == rt.tokenizer.hf.chat_template and info["chat_template"]
    assert info["model_max_length"] == 512
    # errors in the envelope, naming the parameter
    vocab = rt.tokenizer.vocab_size
    for bad in ([vocab], [-1], [1, 10**9]):
        r = post(server, "/detokenize", {"tokens": bad})
        assert r.status_code == 400 and error_of(r)["param"] == "tokens", r.text
    r = post(server, "/tokenize", {"model": "no-such-model", "prompt": "x"})
    assert r.status_code == 404 and error_of(r)["param"] == "model"
    r = post(server, "/tokenize", {"model": "full", "prompt": "x"}, tenant="bob")  # e2b only
    assert r.status_code == 403
    r = post(server, "/tokenize", {"prompt": "x", "unknown": 1})
    assert r.status_code == 400
    with httpx.Client(base_url=server.base_url) as anonymous:
        assert anonymous.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert anonymous.post("/detokenize", json={"tokens": [2]}).status_code == 401
    # past the character cap of the tier's prompts (fuzz: 512 tokens x 16 characters at most)
    r = post(server, "/tokenize", {"prompt": "x" * 9000}, tenant="fuzz")
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        server.openai().completions.create(model=SUBNET, prompt="x", max_tokens=0)
