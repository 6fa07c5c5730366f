"""Sampling defaults: a checkpoint's generation_config.json over OpenAI's, a request's own values
over both, and the server switch that ignores the file. Plain Python: no model, no server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.checkpoint.generation_config import sampling_defaults
from server.config import ConfigError, load_config
from server.vocabulary.sampling_defaults import SamplingDefaults

REPO = Path(__file__).resolve().parents[2]
# google/gemma-3n-E4B-it's generation_config.json (the dev checkpoints write the same fields).
GEMMA = {
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "do_sample": True,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
    "top_k": 64,
    "top_p": 0.95,
    "transformers_version": "4.53.0.dev0",
}


def test_module_does_not_import_torch() -> None:
    code = (
        "import sys, server.vocabulary.sampling_defaults as m; "
        "m.SamplingDefaults.from_generation_config({'top_k': 3}, 'x').params(); "
        "assert 'torch' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_gemma_generation_config_sets_top_k_and_top_p_only() -> None:
    d = SamplingDefaults.from_generation_config(GEMMA, "generation_config.json")
    assert (d.top_k, d.top_p) == (64, 0.95)
    # Everything it does not name keeps OpenAI's default (do_sample is not read, as in vLLM).
    assert (d.temperature, d.min_p, d.repetition_penalty) == (1.0, 0.0, 1.0)
    assert (d.presence_penalty, d.frequency_penalty) == (0.0, 0.0)
    assert d.as_dict()["source"] == "generation_config.json"


def test_every_sampling_field_is_read() -> None:
    config = {
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.2,
        "frequency_penalty": -0.3,
        "max_new_tokens": 99,  # not a sampling default here (tiers bound max_tokens)
    }
    p = SamplingDefaults.from_generation_config(config, "g").params()
    got = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)
    assert got == (0.7, 40, 0.9, 0.05, 1.1)
    assert (p.presence_penalty, p.frequency_penalty, p.max_tokens) == (0.2, -0.3, 16)


def test_top_k_of_zero_or_less_is_off() -> None:
    assert SamplingDefaults.from_generation_config({"top_k": -1}, "g").top_k == 0
    assert SamplingDefaults.from_generation_config({"top_k": 0}, "g").top_k == 0


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"top_p": 0}, "top_p must be in"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"top_k": True}, "top_k must be a number"),
        ({"min_p": "0.1"}, "min_p must be a number"),
    ],
)
def test_invalid_values_name_the_file_and_field(config: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        SamplingDefaults.from_generation_config(config, "ckpt/generation_config.json")
    assert "ckpt/generation_config.json" in str(info.value)


def test_request_values_win_and_none_means_unset() -> None:
    d = SamplingDefaults.from_generation_config(GEMMA, "g")
    # Unset: the model's defaults.
    assert (d.params().top_k, d.params(top_p=None).top_p) == (64, 0.95)
    # Set, even to OpenAI's own defaults: the request's values.
    p = d.params(top_k=0, top_p=1.0, temperature=0.0, max_tokens=5, seed=3)
    assert (p.top_k, p.top_p, p.temperature, p.max_tokens, p.seed) == (0, 1.0, 0.0, 5, 3)


def test_reading_a_checkpoint_folder(tmp_path: Path) -> None:
    assert sampling_defaults(tmp_path) == SamplingDefaults()  # no file: OpenAI's
    (tmp_path / "generation_config.json").write_text(json.dumps(GEMMA))
    assert sampling_defaults(tmp_path).top_k == 64
    assert sampling_defaults(tmp_path, "openai") == SamplingDefaults()  # the switch
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        sampling_defaults(tmp_path)
    with pytest.raises(ValueError, match="must come from one of"):
        sampling_defaults(tmp_path, "vllm")


def test_server_setting(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    assert load_config(None, env={}).sampling_defaults == "generation_config"
    path.write_text("sampling_defaults: openai\n")
    assert load_config(path, env={}).sampling_defaults == "openai"
    path.write_text("sampling_defaults: vllm\n")
    with pytest.raises(ConfigError, match="sampling_defaults must be one of generation_config"):
        load_config(path, env={})
