"""The tokenizer files of the dev checkpoints the project generates for itself.

Owns: the fixed special-token layout (ids 0..363, mirroring where Gemma puts its control tokens),
a deterministic BPE merge learner run over a small embedded English corpus, and writing the four
files `transformers.AutoTokenizer.from_pretrained` reads: `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` and `chat_template.jinja` (Gemma's turn format, in our own words).

Deliberately does not know: model configs or weights, which checkpoint a folder belongs to, the
vision/audio vocabularies that sit above the text ids, or anything about serving. A real Gemma 3n
checkpoint brings its own tokenizer; nothing here is used for one.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE


@dataclass(frozen=True)
class DevTokenIds:
    """Ids of the tokens the runtime and the chat template refer to by meaning."""

    pad: int
    eos: int
    bos: int
    unk: int
    mask: int
    start_of_image: int
    start_of_audio: int
    start_of_turn: int
    end_of_turn: int


DEV_TOKEN_IDS = DevTokenIds(
    pad=0,
    eos=1,
    bos=2,
    unk=3,
    mask=4,
    start_of_image=5,
    start_of_audio=6,
    start_of_turn=105,
    end_of_turn=106,
)

SPACE = "▁"  # U+2581: SentencePiece's visible space; the normalizer maps " " to it
_UNUSED_BEFORE_TURNS = 98  # <unused0>..<unused97> fill ids 7..104
_FIRST_BYTE = 107  # <0x00>..<0xFF> at 107..362, the byte fallback for any character
_SPACE_ID = _FIRST_BYTE + 256  # 363
_FIRST_LEARNED = _SPACE_ID + 1  # 364
# Below this the learned part would be too small to exercise merges at all.
MIN_TEXT_VOCAB_SIZE = 400
_MODEL_MAX_LENGTH = 32768
_MIN_PAIR_COUNT = 2  # a pair seen once is memorisation, not a merge worth a vocabulary slot

# Plain prose written for this project. It only has to give the merge learner frequent English
# fragments, capitals, digits and punctuation; '<' and '>' are kept out so no learned token can
# collide with a control token.
_CORPUS = """
The harbor town wakes before the sun. Fishing boats leave the quay at four in the morning, and
by seven the first of them are back with their nets full of silver fish. The market opens when
the church bell rings eight times, and people from the villages in the hills come down to buy
bread, cheese, fruit and whatever the sea has given that day.

Weather decides almost everything here. When the wind comes from the north, the water turns grey
and the waves climb over the wall of the old pier. Nobody sails on those days. The children stay
inside, the cafes fill with sailors telling the same stories they told last winter, and the
baker sells twice as many warm rolls as usual. When the wind turns south again, the whole town
seems to breathe out at once.

My grandmother kept a small notebook in which she wrote the weather of every single day for
forty-two years. She used a pencil, never a pen, because ink runs when it gets wet. Her entries
were short: "Clear, cold, calm." or "Rain since noon; the roof leaks again." Reading them now is
strange and beautiful. You can follow the seasons turning, the storms of 1987 and 1999, the
summer the well went dry, and the morning she wrote only one word: "Snow!"

Cooking in that kitchen was simple but careful. Onions were sliced thin and softened slowly in
olive oil, never hurried. Tomatoes went in next, then garlic, a little salt, and a handful of
herbs picked from the pots by the door. She said that patience was the most important
ingredient, and that you could taste the difference between a sauce that had been watched and
a sauce that had been forgotten. I still believe she was right.

A workshop teaches a different kind of patience. The machine in the corner is older than
anyone who works there, and it only runs properly if you listen to it. A steady hum means that
the bearings are happy; a rattle means that something has come loose; silence, of course, means
that someone forgot to pay the electricity bill. Every tool has its place on the wall, traced
in white paint, so that a missing hammer or a lost screwdriver is noticed immediately.

Engineers like to say that a system is only as strong as its weakest part. That is true, but
it is not the whole truth. A system is also only as useful as its documentation, only as fast
as its slowest step, and only as reliable as the tests that check it. When a program fails at
three in the morning, nobody cares how elegant the design was. They care whether the logs are
clear, whether the error message explains what happened, and whether the fix can be tested
quickly.

Questions are the beginning of learning. Why does the moon change its shape? How do birds find
their way home across thousands of kilometers? What would happen if every person in the city
turned on their kettle at exactly the same moment? Some questions have answers that fit in a
sentence; others take a lifetime. The best teachers are the ones who make their students want
to ask the next question, and the one after that.

The train to the capital leaves from platform 3 at 10:45 and arrives at 14:20, if it is on
time, which it usually is not. A ticket costs 37 euros, or 25 with a student card. Passengers
read, sleep, eat sandwiches wrapped in paper, and watch the fields go by: wheat, then sunflowers,
then vineyards climbing the slopes of low green hills. Somewhere near the middle of the journey
the line crosses a long bridge over a wide brown river, and everyone looks out of the window.

"Are you coming with us tomorrow?" she asked. "We are walking up to the lighthouse, and then
along the cliffs to the next bay." He thought about it for a moment. His legs were still tired
from the day before, but the forecast promised sunshine, and he did not want to spend another
afternoon reading in his room. "Yes," he said at last. "I'll bring water and something to eat."

Libraries are quiet places full of noise. Every shelf holds arguments, jokes, recipes, maps,
letters, confessions and instructions for building things that no longer exist. Some books
have not been opened for decades; others are borrowed so often that their covers are held
together with tape. The librarian knows which ones are which, and she will tell you, if you
ask politely, where to find the book you need rather than the one you asked for.

Numbers are everywhere once you start looking for them. A year has 365 days, or 366 in a leap
year. A dozen eggs is 12, a baker's dozen is 13, and a score is 20. Water boils at 100 degrees
at sea level but at a lower temperature on a high mountain, which is why pasta takes longer to
cook in the Alps. Light from the sun needs about 8 minutes to reach us, and the nearest star
after the sun is more than 4 years away at that speed.

In the evening the harbor grows calm again. Lamps are lit along the water, the boats rock
gently against their ropes, and the smell of grilled fish drifts out of open windows. Old men
play cards on a bench near the fountain, arguing about rules they have known for sixty years.
Somewhere a radio is playing music from another decade. The day is over, and tomorrow the
boats will leave again before the sun comes up.
"""

# Gemma's turn format, written for this project. A system message is not a turn: its text opens
# the first user turn, followed by a blank line, as Gemma 3 does. Roles must alternate starting
# with the user; anything else is a caller bug, so the template refuses rather than guesses.
_CHAT_TEMPLATE = """\
{%- macro text_of(content) -%}
  {%- if content is string -%}
    {{- content -}}
  {%- else -%}
    {%- for part in content -%}
      {%- if part['type'] != 'text' -%}
        {{- raise_exception('Dev chat template: only text content parts are supported, got '
            ~ part['type']) -}}
      {%- endif -%}
      {{- part['text'] -}}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set preamble = '' -%}
{%- set turns = messages -%}
{%- set offset = 0 -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set preamble = (text_of(messages[0]['content']) | trim) ~ '\\n\\n' -%}
  {%- set turns = messages[1:] -%}
  {%- set offset = 1 -%}
  {%- if not turns -%}
    {{- raise_exception('Dev chat template: a system message must be followed by'
        ~ ' a user message') -}}
  {%- endif -%}
{%- endif -%}
{%- for message in turns -%}
  {%- set speaker = 'user' if message['role'] == 'user' else (
      'model' if message['role'] in ['assistant', 'model'] else 'other') -%}
  {%- if speaker != ('user' if loop.index0 % 2 == 0 else 'model') -%}
    {{- raise_exception('Dev chat template: after an optional system message, roles must alternate'
        ~ ' user/assistant starting with user; messages[' ~ (loop.index0 + offset) ~ '] has role '
        ~ message['role']) -}}
  {%- endif -%}
  {{- '<start_of_turn>' ~ speaker ~ '\\n' -}}
  {%- if loop.first -%}{{- preamble -}}{%- endif -%}
  {{- text_of(message['content']) | trim -}}
  {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""


def _fixed_tokens() -> list[str]:
    """Ids 0..363 in order: control tokens, reserved slots, byte fallback, the bare space."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_image>", "<start_of_audio>"]
    tokens += [f"<unused{i}>" for i in range(_UNUSED_BEFORE_TURNS)]
    tokens += ["<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens.append(SPACE)
    assert len(tokens) == _FIRST_LEARNED
    return tokens


def _corpus_pieces() -> Counter[str]:
    """The embedded corpus's pieces (see `text_pieces`)."""
    paragraphs = [" ".join(p.split()) for p in _CORPUS.strip().split("\n\n")]
    return text_pieces("\n\n".join(paragraphs))


def text_pieces(text: str) -> Counter[str]:
    """Split text the way SentencePiece sees words: each piece owns its leading space, so no
    merge can span two words. Newline runs are pieces of their own, and so are '<' and '>', so no
    learned token can look like a control token ("<...>")."""
    text = text.replace(" ", SPACE)
    return Counter(re.findall(rf"{SPACE}?[<>]|{SPACE}?[^{SPACE}\n<>]+|\n+|{SPACE}+", text))


@cache
def _learn_merges() -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """The merges of the embedded corpus (see `learn_merges`)."""
    return learn_merges(_corpus_pieces())


def learn_merges(
    piece_counts: Counter[str],
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Classic BPE over the corpus pieces: repeatedly merge the most frequent adjacent pair.

    Ties go to the lexicographically smallest pair, and no set or dict iteration order reaches the
    result, so the output is the same in every process. Returns (merges in rank order, characters
    of the corpus from most to least frequent)."""
    pieces = sorted(piece_counts.items())
    words = [list(piece) for piece, _ in pieces]
    freqs = [freq for _, freq in pieces]

    char_counts: Counter[str] = Counter()
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for idx, (symbols, freq) in enumerate(zip(words, freqs, strict=True)):
        for ch in symbols:
            char_counts[ch] += freq
        for pair in itertools.pairwise(symbols):
            pair_counts[pair] += freq
            where.setdefault(pair, set()).add(idx)

    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg_count, pair = heapq.heappop(heap)
        if -neg_count != pair_counts.get(pair, 0):
            continue  # stale entry: the pair's count changed after it was pushed
        if -neg_count < _MIN_PAIR_COUNT:
            break
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for idx in sorted(where.pop(pair)):
            old, freq = words[idx], freqs[idx]
            for p in itertools.pairwise(old):
                pair_counts[p] -= freq
                touched.add(p)
            new: list[str] = []
            i = 0
            while i < len(old):
                if i + 1 < len(old) and (old[i], old[i + 1]) == pair:
                    new.append(merged)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            words[idx] = new
            for p in itertools.pairwise(new):
                pair_counts[p] += freq
                where.setdefault(p, set()).add(idx)
                touched.add(p)
        for p in sorted(touched):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]  # `where` may keep stale indices; they only cost a rescan
    chars = sorted((ch for ch in char_counts if ch != SPACE), key=lambda c: (-char_counts[c], c))
    return tuple(merges), tuple(chars)


def _learned_vocab(
    budget: int, learned: tuple[tuple[tuple[str, str], ...], tuple[str, ...]] | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """Up to `budget` learned tokens and the merges that build them.

    Merges are taken in rank order, each preceded by any character it needs, so every prefix is
    a consistent BPE vocabulary; the corpus characters no merge used come last."""
    merges, chars = learned if learned is not None else _learn_merges()
    tokens: list[str] = []
    have = {SPACE}
    kept: list[tuple[str, str]] = []
    for left, right in merges:
        new = [t for t in dict.fromkeys((left, right, left + right)) if t not in have]
        if len(tokens) + len(new) > budget:
            break
        tokens += new
        have.update(new)
        kept.append((left, right))
    for ch in chars:
        if len(tokens) == budget:
            break
        if ch not in have:
            tokens.append(ch)
            have.add(ch)
    return tokens, kept


def _build_tokenizer(
    text_vocab_size: int,
    learned_merges: tuple[tuple[tuple[str, str], ...], tuple[str, ...]] | None = None,
) -> Tokenizer:
    fixed = _fixed_tokens()
    learned, merges = _learned_vocab(text_vocab_size - len(fixed), learned_merges)
    # Spare ids continue the <unusedN> numbering, like Gemma's own reserved slots.
    n_spare = text_vocab_size - len(fixed) - len(learned)
    filler = [f"<unused{_UNUSED_BEFORE_TURNS + i}>" for i in range(n_spare)]
    vocab_list = fixed + learned + filler
    vocab = {token: i for i, token in enumerate(vocab_list)}
    if len(vocab) != len(vocab_list):
        raise RuntimeError("dev tokenizer: a learned token collides with a fixed token")

    # fuse_unk and byte_fallback as in transformers' GemmaTokenizer, which rebuilds the model from
    # this file's vocab and merges with exactly these options.
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Replace(" ", SPACE)
    # The split on " " runs after the normalizer has replaced every space, so it never fires: the
    # whole text is one BPE word. It is kept because it is what GemmaTokenizer installs, so the
    # file and the class that loads it describe the same pipeline.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    bos = "<bos>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, DEV_TOKEN_IDS.bos)],
    )
    # Control tokens are matched before normalisation and never split; byte tokens and the space
    # are ordinary vocabulary, as in Gemma.
    specials = [
        t for t in vocab_list if t.startswith("<") and t.endswith(">") and not t.startswith("<0x")
    ]
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
            for t in specials
        ]
    )
    return tok


def _tokenizer_config() -> dict[str, Any]:
    return {
        # transformers 5 maps GemmaTokenizer to a tokenizers-backed class that needs only
        # tokenizer.json (no sentencepiece model); it keeps this file's vocab, merges and
        # post-processor but installs its own normalizer/decoder, identical to ours.
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        # Decoding must give back the exact text; the cleanup would eat spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": _MODEL_MAX_LENGTH,
        # Gemma pads on the left so a batch's prompts all end where generation starts.
        "padding_side": "left",
    }


def _special_tokens_map() -> dict[str, str]:
    return {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
    }


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_dev_tokenizer(
    out_dir: Path, text_vocab_size: int, piece_counts: Counter[str] | None = None
) -> DevTokenIds:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja
    into out_dir (which exists). Deterministic: the same text_vocab_size gives byte-identical files.

    `piece_counts` (from `text_pieces` over a training corpus) replaces the embedded corpus as
    what the merges are learned from; the fixed ids, options and chat template stay the same.
    """
    if isinstance(text_vocab_size, bool) or not isinstance(text_vocab_size, int):
        raise TypeError(f"text_vocab_size must be an int, got {text_vocab_size!r}")
    if text_vocab_size < MIN_TEXT_VOCAB_SIZE:
        raise ValueError(
            f"text_vocab_size={text_vocab_size} is too small for the dev tokenizer: ids 0.."
            f"{_FIRST_LEARNED - 1} are fixed control, byte and space tokens, and at least "
            f"{MIN_TEXT_VOCAB_SIZE} is needed to leave room for learned merges"
        )
    out_dir = Path(out_dir)
    files = {
        "tokenizer.json": _build_tokenizer(
            text_vocab_size, None if piece_counts is None else learn_merges(piece_counts)
        ).to_str(pretty=True)
        + "\n",
        "tokenizer_config.json": _dump_json(_tokenizer_config()),
        "special_tokens_map.json": _dump_json(_special_tokens_map()),
        "chat_template.jinja": _CHAT_TEMPLATE,
    }
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")
    return DEV_TOKEN_IDS
