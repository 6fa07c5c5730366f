"""lm-evaluation-harness against a live server: its `local-completions` model, on two small
tasks written here, for two pinned subnets.

Proves: lm-eval's log-likelihood path (echo, logprobs, max_tokens 1, token-id prompts) and its
generate_until path run end to end against the server, with the server as the tokenizer (lm-eval
detects /tokenizer_info, /tokenize and /detokenize and uses them: no tokenizer download), and
produce a score per task; every log-likelihood is finite and <= 0; the same requests get the same
scores when asked again (the server computes a scoring request alone and from scratch: no prefix
cache, so the same arithmetic); two subnets give different scores (the `model` field pins the
subnet). No particular accuracy is asserted: the tiny model is random.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.api.live import LiveServer

MC_DOCS = [
    {"question": "The color of the sky on a clear day is", "choices": ["blue", "green", "red"]},
    {"question": "Two plus two equals", "choices": ["four", "five", "three"]},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "Rankine"]},
    {"question": "The opposite of hot is", "choices": ["cold", "warm", "loud"]},
    {"question": "A baby cat is called a", "choices": ["kitten", "puppy", "calf"]},
]
GEN_DOCS = [
    {"question": "Name a river.", "answer": "Nile"},
    {"question": "Name a color.", "answer": "blue"},
    {"question": "Name a number.", "answer": "seven"},
]

MC_TASK = """task: concentric_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """task: concentric_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path) -> None:
    for name, docs, template in (
        ("mc", MC_DOCS, MC_TASK),
        ("gen", GEN_DOCS, GEN_TASK),
    ):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(template.format(data=data))


@pytest.fixture(scope="module")
def evaluate(server: LiveServer, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("OPENAI_API_KEY", server.keys["alice"])  # lm-eval's bearer token
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder)
    manager = TaskManager(include_path=str(folder))

    def run(subnet: str, tasks: list[str]) -> dict:
        return lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": subnet,
                "base_url": f"{server.base_url}/v1/completions",
                "tokenizer_backend": "remote",  # the server's /tokenize, /detokenize
                "auth_token": server.keys["alice"],
                "add_bos_token": True,
                "max_length": 512,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            tasks=tasks,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=0,
        )

    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def loglikelihoods(results: dict) -> list[list[float]]:
    """Per document, each choice's log-likelihood."""
    samples = sorted(results["samples"]["concentric_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def test_lm_eval_scores_two_pinned_subnets(evaluate) -> None:
    scores = {}
    for subnet in ("e2b", "full"):
        results = evaluate(subnet, ["concentric_mc", "concentric_gen"])
        acc = results["results"]["concentric_mc"]["acc,none"]
        exact = results["results"]["concentric_gen"]["exact_match,none"]
        assert 0 <= acc <= 1 and 0 <= exact <= 1
        lls = loglikelihoods(results)
        assert len(lls) == len(MC_DOCS) and all(len(d) == 3 for d in lls)
        assert all(math.isfinite(v) and v <= 0 for d in lls for v in d)
        gens = results["samples"]["concentric_gen"]
        assert len(gens) == len(GEN_DOCS)
        assert all(isinstance(g["filtered_resps"][0], str) for g in gens)
        scores[subnet] = lls
    assert scores["e2b"] != scores["full"]  # the model field pinned two different subnets
    again = loglikelihoods(evaluate("e2b", ["concentric_mc"]))
    assert again == scores["e2b"]  # the same requests, the same scores
