"""Training the dev model, at the `tiny` preset's sizes on a made-up corpus (seconds, never the
real run): batches and subnets are functions of (seed, step), a stopped and resumed run reaches
the same weights as an uninterrupted one, and a subnet trains exactly as it is served."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from server.tools import corpus, training
from server.tools.dev_model import PRESETS
from server.tools.dev_tokenizer import DEV_TOKEN_IDS

TINY = PRESETS["tiny"]
PLAN = training.TrainPlan(
    steps=3,
    batch=2,
    seq_len=24,
    warmup=1,
    checkpoint_every_s=0.0,  # a checkpoint after every step
    source_weights={"prose": 0.5, "wordnet": 0.5},
)
WORDS = ["the", "river", "runs", "by", "a", "bright", "town", "where", "people", "walk", "and"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A prepared corpus (as `prepare_corpus` writes one) with no download behind it."""
    root = tmp_path_factory.mktemp("work")
    c = root / "corpus"
    (c / "train").mkdir(parents=True)
    prose = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(30)]
    chats = [
        corpus.chat_text(f'What does "{w}" mean?', f"{w.title()} (noun): a {w}.") for w in WORDS
    ]
    for name, docs in (("prose", prose), ("wordnet", chats)):
        (c / "train" / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs)
        )
    (c / corpus.MANIFEST).write_text("{}")
    return c


def work_with(corpus_dir: Path, tmp_path: Path, name: str) -> Path:
    work = tmp_path / name
    work.mkdir()
    (work / "corpus").symlink_to(corpus_dir)
    return work


def test_batches_and_subnets_are_functions_of_seed_and_step(corpus_dir: Path, tmp_path: Path):
    tok = training.train_tokenizer(corpus_dir, tmp_path / "tok", TINY.text_vocab)
    sources = training.tokenize_split(corpus_dir, tok, "train", tmp_path / "tokens")
    a, b = training.make_batch(PLAN, sources, 5), training.make_batch(PLAN, sources, 5)
    assert a.shape == (PLAN.batch, PLAN.seq_len + 1) and (a == b).all()
    assert not (a == training.make_batch(PLAN, sources, 6)).all()
    assert a.min() >= 0 and a.max() < TINY.text_vocab
    # Every document starts with <bos>, as at inference.
    assert (sources["prose"].tokens[sources["prose"].starts[:-1]] == DEV_TOKEN_IDS.bos).all()

    official = training.official_shapes(TINY)
    assert len(official) == 16
    for step in range(200):
        s = training.sample_subnet(PLAN, official, step, TINY.ffn)
        assert s == training.sample_subnet(PLAN, official, step, TINY.ffn)
        assert s.name != "full" and len(s.widths) == 35
        assert all(s.widths[i] is not None for i in training.KV_PRODUCERS)
        assert all(w is None or 0 < w <= TINY.ffn for w in s.widths)


def test_a_resumed_run_reaches_the_weights_of_an_uninterrupted_one(
    corpus_dir: Path, tmp_path: Path
):
    torch.set_num_threads(1)  # the run's own setting; identical sums need identical threads
    try:
        straight = work_with(corpus_dir, tmp_path, "straight")
        training.train(straight, PLAN, preset=TINY)
        resumed = work_with(corpus_dir, tmp_path, "resumed")
        training.train(resumed, PLAN, preset=TINY, stop_at=1)
        assert torch.load(resumed / "run/state.pt", weights_only=False)["step"] == 1
        training.train(resumed, PLAN, preset=TINY)
    finally:
        torch.set_num_threads(2)
    a = torch.load(straight / "run/state.pt", weights_only=False)
    b = torch.load(resumed / "run/state.pt", weights_only=False)
    assert a["step"] == b["step"] == PLAN.steps
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    logs = [(w / "run/log.jsonl").read_text().splitlines() for w in (straight, resumed)]
    strip = [
        [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in log] for log in logs
    ]
    assert strip[0] == strip[1] and len(strip[0]) == PLAN.steps
    # A plan change is refused rather than silently mixed into the run.
    with pytest.raises(ValueError, match="different plan"):
        training.train(resumed, replace(PLAN, lr=1e-4), preset=TINY)


def test_a_cooldown_given_mid_run_equals_one_planned_from_the_start(
    corpus_dir: Path, tmp_path: Path
):
    # The committed model's run was given its cooldown while it ran (the shared machine was
    # slower than planned); that is reproducible only if the steps before it are unchanged.
    long = replace(PLAN, steps=10)
    short = replace(long, cooldown_start=2, cooldown_steps=1)
    assert short.total_steps == 3
    assert [training.lr_at(short, s) for s in (0, 1)] == [training.lr_at(long, s) for s in (0, 1)]
    assert training.lr_at(short, 2) == pytest.approx(long.lr * long.min_lr_ratio)
    torch.set_num_threads(1)
    try:
        planned = work_with(corpus_dir, tmp_path, "planned")
        training.train(planned, short, preset=TINY)
        given = work_with(corpus_dir, tmp_path, "given")
        training.train(given, long, preset=TINY, stop_at=2)
        training.train(given, short, preset=TINY)
        with pytest.raises(ValueError, match="different plan"):  # a cooldown in the past
            training.train(given, replace(long, cooldown_start=1, cooldown_steps=1), preset=TINY)
    finally:
        torch.set_num_threads(2)
    a = torch.load(planned / "run/state.pt", weights_only=False)
    b = torch.load(given / "run/state.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
