"""The dev tokenizer's files load with transformers and behave like Gemma's tokenizer."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from server.tools.dev_tokenizer import DEV_TOKEN_IDS, write_dev_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
SIZES = (512, 4096)


@pytest.fixture(scope="module")
def dev_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    dirs = {}
    for size in SIZES:
        out = tmp_path_factory.mktemp(f"tok{size}")
        assert write_dev_tokenizer(out, size) == DEV_TOKEN_IDS
        dirs[size] = out
    return dirs


@pytest.fixture(scope="module")
def toks(dev_dirs: dict[int, Path]) -> dict[int, Any]:
    return {size: AutoTokenizer.from_pretrained(path) for size, path in dev_dirs.items()}


@pytest.fixture(scope="module")
def tok(toks: dict[int, Any]) -> Any:
    return toks[4096]


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


@pytest.mark.parametrize("size", SIZES)
def test_loads_with_autotokenizer_with_exact_vocab_size(toks: dict[int, Any], size: int) -> None:
    tok = toks[size]
    assert type(tok).__name__ == "GemmaTokenizer"
    assert len(tok) == size
    assert tok.vocab_size == size
    assert sorted(tok.get_vocab().values()) == list(range(size))


def test_fixed_ids_map_to_the_gemma_strings(tok: Any) -> None:
    assert asdict(DEV_TOKEN_IDS) == {
        "pad": 0,
        "eos": 1,
        "bos": 2,
        "unk": 3,
        "mask": 4,
        "start_of_image": 5,
        "start_of_audio": 6,
        "start_of_turn": 105,
        "end_of_turn": 106,
    }
    expected = {
        0: "<pad>",
        1: "<eos>",
        2: "<bos>",
        3: "<unk>",
        4: "<mask>",
        5: "<start_of_image>",
        6: "<start_of_audio>",
        7: "<unused0>",
        104: "<unused97>",
        105: "<start_of_turn>",
        106: "<end_of_turn>",
        107: "<0x00>",
        107 + 0x41: "<0x41>",
        362: "<0xFF>",
        363: "▁",
    }
    for idx, token in expected.items():
        assert tok.convert_ids_to_tokens(idx) == token, idx
    ids = DEV_TOKEN_IDS
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (ids.pad, ids.eos, ids.bos)
    assert (tok.unk_token_id, tok.mask_token_id) == (ids.unk, ids.mask)


@pytest.mark.parametrize("size", SIZES)
def test_spare_ids_continue_the_unused_numbering(toks: dict[int, Any], size: int) -> None:
    tokens = toks[size].convert_ids_to_tokens(list(range(size)))
    spare = [i for i in range(364, size) if tokens[i].startswith("<unused")]
    if size == 512:
        assert spare == []  # the learned merges alone overflow 148 slots
        return
    assert spare == list(range(spare[0], size))  # one block at the top
    assert [tokens[i] for i in spare] == [f"<unused{98 + k}>" for k in range(len(spare))]


def test_encode_prepends_a_single_bos_and_no_eos(tok: Any) -> None:
    ids = tok("the sun")["input_ids"]
    assert ids[0] == DEV_TOKEN_IDS.bos
    assert ids.count(DEV_TOKEN_IDS.bos) == 1
    assert DEV_TOKEN_IDS.eos not in ids
    assert tok("the sun", add_special_tokens=False)["input_ids"] == ids[1:]


ROUND_TRIP = [
    "The harbor town wakes before the sun.",
    "naïve café",
    "你好，世界",
    "🙂👍",
    "two  spaces and   three",
    "  leading and trailing  ",
    "line one\nline two\n\nline four\n",
    "tabs\tand (punctuation): a, b; c! 3.14 ?",
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(toks: dict[int, Any], size: int, text: str) -> None:
    tok = toks[size]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_transformers_and_the_raw_tokenizer_file_agree(dev_dirs: dict[int, Path], tok: Any) -> None:
    # GemmaTokenizer rebuilds its pipeline and keeps only our vocab/merges/post-processor; the
    # file must describe the same tokenizer so non-transformers readers see identical ids.
    raw = Tokenizer.from_file(str(dev_dirs[4096] / "tokenizer.json"))
    for text in [*ROUND_TRIP, "<start_of_turn>user\nhi<end_of_turn>\n"]:
        assert tok(text)["input_ids"] == raw.encode(text).ids, text


def test_merges_compress_common_words(toks: dict[int, Any]) -> None:
    for size, words in {
        512: [" the", " and"],
        4096: [" the", " weather", " morning", "ing"],
    }.items():
        tok = toks[size]
        for word in words:
            ids = tok(word, add_special_tokens=False)["input_ids"]
            assert len(ids) < len(word.encode("utf-8")), (size, word, ids)
    sentence = "The boats leave the harbor in the morning when the weather is calm."
    ids = toks[4096](sentence, add_special_tokens=False)["input_ids"]
    assert len(ids) * 2 < len(sentence)


def test_control_tokens_are_never_split(tok: Any) -> None:
    ids = tok("<start_of_turn>user\nhi<end_of_turn>\n<unused3><start_of_image>")["input_ids"]
    assert ids[1] == DEV_TOKEN_IDS.start_of_turn
    assert DEV_TOKEN_IDS.end_of_turn in ids
    assert tok.convert_tokens_to_ids("<unused3>") in ids
    assert ids[-1] == DEV_TOKEN_IDS.start_of_image


def test_pads_on_the_left(tok: Any) -> None:
    batch = tok(["hi", "a much longer prompt"], padding=True)["input_ids"]
    assert batch[0][0] == DEV_TOKEN_IDS.pad
    assert batch[0][-1] != DEV_TOKEN_IDS.pad


CONVERSATION = [
    {"role": "system", "content": "You are terse. "},
    {"role": "user", "content": "  Hi there\n"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye."},
]
EXPECTED_PROMPT = (
    "<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
    "<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nBye.<end_of_turn>\n"
    "<start_of_turn>model\n"
)


def test_chat_template_comes_from_the_jinja_file(dev_dirs: dict[int, Path], tok: Any) -> None:
    assert tok.chat_template == (dev_dirs[4096] / "chat_template.jinja").read_text("utf-8")


def test_chat_template_renders_gemma_turns(tok: Any) -> None:
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED_PROMPT
    no_prompt = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert no_prompt == EXPECTED_PROMPT.removesuffix("<start_of_turn>model\n")


def test_chat_template_tokenizes_with_one_bos(tok: Any) -> None:
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    assert ids[:2] == [DEV_TOKEN_IDS.bos, DEV_TOKEN_IDS.start_of_turn]
    assert ids.count(DEV_TOKEN_IDS.bos) == 1
    assert tok.decode(ids) == EXPECTED_PROMPT


def test_chat_template_joins_text_parts(tok: Any) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "One, "}, {"type": "text", "text": "two"}],
        },
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<bos><start_of_turn>user\nBe kind.\n\nOne, two<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"messages\[1\]"),
        ([{"role": "assistant", "content": "a"}], "alternate"),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
            ],
            r"messages\[2\] has role system",
        ),
        ([{"role": "system", "content": "s"}], "followed by a user message"),
        ([{"role": "user", "content": [{"type": "image"}]}], "only text content parts"),
    ],
)
def test_chat_template_rejects_bad_conversations(
    tok: Any, messages: list[dict[str, Any]], match: str
) -> None:
    with pytest.raises(TemplateError, match=match):
        tok.apply_chat_template(messages, tokenize=False)


def test_deterministic_across_calls_and_processes(
    dev_dirs: dict[int, Path], tmp_path: Path
) -> None:
    again = tmp_path / "again"
    again.mkdir()
    write_dev_tokenizer(again, 4096)
    assert _digests(again) == _digests(dev_dirs[4096])
    # A fresh interpreter with a fixed hash seed: any dependence on set or dict iteration order
    # of strings would show up here.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    script = (
        "import sys; from pathlib import Path;"
        "from server.tools.dev_tokenizer import write_dev_tokenizer;"
        "write_dev_tokenizer(Path(sys.argv[1]), 4096)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", script, str(fresh)], check=True, env=env, cwd=REPO_ROOT)
    assert _digests(fresh) == _digests(dev_dirs[4096])


def test_different_sizes_give_different_files(dev_dirs: dict[int, Path]) -> None:
    a, b = _digests(dev_dirs[512]), _digests(dev_dirs[4096])
    assert a["tokenizer.json"] != b["tokenizer.json"]
    assert a["chat_template.jinja"] == b["chat_template.jinja"]


def test_too_small_vocab_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"text_vocab_size=399 is too small.*at least 400"):
        write_dev_tokenizer(tmp_path, 399)
    assert not any(tmp_path.iterdir())  # nothing half-written
    write_dev_tokenizer(tmp_path, 400)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == 400
