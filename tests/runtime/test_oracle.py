"""Correctness against the oracle: Hugging Face transformers' own Gemma 3n.

Greedy tokens must match exactly. Logits are float32 on both sides with the same operation
order, so they differ only by rounding: compared with the suite's float32 rule
(tests/runtime/conftest.py: a bound measured against the same logits in float64).

The full model on the checkpoint is checked against transformers' own `generate()` (its cached
decode path). Each subnet's view is checked against its export with one teacher-forced forward
of transformers over the prompt and our tokens: its argmax after every prefix of our tokens must
be our next token, which is what its greedy `generate()` would pick step by step, and its logits
there are what each decode step saw. One forward instead of 32 cached steps keeps the ~40
per-subnet tests to a fraction of the time with the same claims.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from transformers import AutoConfig, Gemma3nForCausalLM

from server.engine.offline import GenerationRequest, greedy
from server.tools.export import export_subnet
from tests.runtime.conftest import (
    alone,
    assert_float32_close,
    decode_reference,
    prefill_logits,
    prompt_ids,
)

STEPS = 32


def hf_model(folder) -> Gemma3nForCausalLM:
    cfg = AutoConfig.from_pretrained(folder)
    model = Gemma3nForCausalLM.from_pretrained(folder, config=cfg.text_config, dtype=torch.float32)
    return model.eval()


def hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out.sequences[0, len(ids) :].tolist(), torch.stack(out.logits)[:, 0]


def test_full_subnet_equals_transformers_on_the_checkpoint(tiny, tiny64, tiny_dir):
    # 80 tokens cross the tiny preset's 32-token sliding window, so the window, the full layers
    # and the KV-consumer layers (20..34) are all exercised.
    ids = prompt_ids(80, seed=1)
    model = hf_model(tiny_dir)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = prefill_logits(tiny, tiny.subnets.full, ids)
    exact = prefill_logits(tiny64, tiny.subnets.full, ids)
    assert_float32_close(ref, ours, exact, "prefill logits vs transformers")

    hf_tokens, hf_logits = hf_greedy(model, ids, STEPS)
    result = alone(tiny, GenerationRequest(tiny.subnets.full, ids, greedy(STEPS)), keep_logits=True)
    assert result.token_ids == hf_tokens
    ours = torch.stack(result.logits)
    exact = decode_reference(tiny64, tiny.subnets.full, ids, result.token_ids)
    assert_float32_close(hf_logits, ours, exact, "decode logits vs transformers")


def all_subnets():
    # Resolved lazily against the tiny checkpoint inside the test; names are the table's.
    from server.tools.dev_model import PRESETS, text_config_dict
    from server.vocabulary.subnets import load_subnet_table
    from server.vocabulary.text_config import text_config_from_dict

    text = text_config_from_dict(text_config_dict(PRESETS["tiny"]))
    return load_subnet_table(text).names()


@pytest.mark.parametrize("name", all_subnets())
def test_subnet_view_equals_transformers_on_its_export(tiny, tiny64, tmp_path, name):
    ids = prompt_ids(50, seed=zlib.crc32(name.encode()) % 1000)
    check_view_against_its_export(tiny, tiny64, tmp_path, name, ids)


def trained_subnets():
    from server.tools.dev_model import TRAINED_CHECKPOINT
    from server.vocabulary.subnets import load_subnet_table
    from server.vocabulary.text_config import read_checkpoint_config

    return load_subnet_table(read_checkpoint_config(TRAINED_CHECKPOINT).text).names()


@pytest.mark.parametrize("name", trained_subnets())
def test_trained_subnet_view_equals_transformers_on_its_export(trained, trained64, tmp_path, name):
    # The trained dev model (bf16 weights, both sides computing in float32) on held-out text:
    # its logits are peaked where the random presets' are flat, so greedy runs long real-looking
    # continuations through every subnet.
    from server.tools.quality import HELDOUT_FILE, heldout_windows

    window = heldout_windows(trained, trained.store.folder / HELDOUT_FILE, 1)[1]
    check_view_against_its_export(trained, trained64, tmp_path, name, list(window.ids[:50]))


def check_view_against_its_export(rt, rt64, tmp_path, name: str, ids: list[int]) -> None:
    subnet = rt.subnets[name]
    out = export_subnet(rt.store, subnet, tmp_path / name, progress=False)
    model = hf_model(out)
    assert model.config.num_hidden_layers == len(subnet.layers)

    result = alone(rt, GenerationRequest(subnet, ids, greedy(STEPS)), keep_logits=True)
    tokens = result.token_ids
    assert len(tokens) == STEPS
    n = len(ids)
    with torch.no_grad():  # teacher-forced: every position of the prompt and our tokens
        ref = model(torch.tensor([ids + tokens[:-1]])).logits[0]
    exact = prefill_logits(rt64, subnet, ids + tokens[:-1])
    # transformers' greedy choice after the prompt and each prefix of our tokens (argmax, ties
    # to the lowest id, as generate() picks) is our next token.
    assert ref[n - 1 :].argmax(dim=-1).tolist() == tokens
    ours = prefill_logits(rt, subnet, ids)
    assert_float32_close(ref[:n], ours, exact[:n], "prefill logits")
    ours = torch.stack(result.logits)
    assert_float32_close(ref[n - 1 :], ours, exact[n - 1 :], "decode logits")


def test_subnets_give_visibly_different_outputs(tiny):
    ids = prompt_ids(40, seed=7)
    full = prefill_logits(tiny, tiny.subnets.full, ids)
    for name in ("e2b", "e2.98b-layer", "mix-0.75", "skip-3-7"):
        other = prefill_logits(tiny, tiny.subnets[name], ids)
        agree = (other.argmax(-1) == full.argmax(-1)).float().mean().item()
        assert agree < 0.9, f"{name} agrees with full on {agree:.0%} of positions"
        assert (other - full).abs().max() > 1.0
