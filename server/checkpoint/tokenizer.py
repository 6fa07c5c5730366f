"""The checkpoint's tokenizer and chat template, behind a small interface of token ids.

Owns loading the tokenizer files of a checkpoint folder (transformers' AutoTokenizer, which reads
`tokenizer.json` and `chat_template.jinja`), turning raw text or chat messages into prompt ids, and
ids back into text. Everything past this point sees token ids only.

Chat message content is text, never control: special-token text a message contains
("<start_of_turn>", "<bos>", a modality placeholder) is tokenized as the characters it is, so a
message cannot forge turns or smuggle placeholders; only the template's own markup becomes special
tokens. Raw completions prompts (`encode`) keep special-token text, as other servers do (the
prompt is the caller's own markup), but never get a second BOS.

Deliberately does not know: models, subnets, sampling, or incremental (streaming) detokenization.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer


class TokenizerError(ValueError):
    pass


class TextTokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"checkpoint {folder}: cannot load its tokenizer ({e})") from None
        self.stop_ids = _stop_ids(folder, self.hf)
        self._special = {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        # A quick test before looking for special-token text in a message (a C-level scan).
        self._special_starts = {
            t.content[0] for t in self.hf.added_tokens_decoder.values() if t.content
        }
        self.max_token_chars = _max_token_chars(self.hf)

    def encode(self, text: str) -> list[int]:
        """Raw text, with the BOS the tokenizer adds (no chat template), but one BOS only: a
        prompt that already starts with the BOS's text does not get a second."""
        ids = list(self.hf(text)["input_ids"])
        bos = self.hf.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            del ids[0]
        return ids

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        render: Callable[..., str] | None = None,
    ) -> list[int]:
        """Chat messages through the checkpoint's template (which writes the BOS itself), or
        through `render(messages, tools, bos_token, add_generation_prompt) -> str`, a template
        of the caller's (the API's tool template), which gets `tools` too.

        Special-token text in any string of the messages or tools is swapped for a sentinel
        (private-use characters around a per-call nonce, which no message can guess) before the
        template runs; the rendered prompt is then tokenized piece by piece: the template's text
        with its special tokens, each sentinel as the literal text it stands for. Content
        without special-token text renders and tokenizes exactly as it would have without
        this."""
        if render is None and not self.hf.chat_template:
            raise TokenizerError("this checkpoint's tokenizer has no chat template")
        nonce = secrets.token_hex(8)
        literals: list[str] = []
        safe = [self._shield_all(m, nonce, literals) for m in messages]
        safe_tools = [self._shield_all(t, nonce, literals) for t in tools] if tools else None
        try:
            if render is not None:
                prompt = render(safe, safe_tools, self.hf.bos_token, add_generation_prompt)
            else:
                prompt = self.hf.apply_chat_template(
                    safe, tokenize=False, add_generation_prompt=add_generation_prompt
                )
        except Exception as e:  # jinja's raise_exception and template errors
            raise TokenizerError(f"chat template rejected the messages: {e}") from None
        if not literals:
            return list(self.hf(prompt, add_special_tokens=False)["input_ids"])
        pieces = re.split(f"\ue000{nonce}(\\d+)\ue001", prompt)
        found = [int(k) for k in pieces[1::2]]
        # The checkpoint's template renders every message once. A tool template may leave a
        # string out (a tool's description) or repeat it; either way no sentinel may have been
        # altered (a stray nonce left in the text).
        carried = (
            sorted(found) == list(range(len(literals)))
            if render is None
            else set(found) <= set(range(len(literals)))
            and not any(nonce in p for p in pieces[0::2])
        )
        if not carried:
            raise TokenizerError(
                "a message contains special-token text, and this chat template does not carry "
                "message text through unchanged, so it cannot be kept as text"
            )
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self.hf(piece, add_special_tokens=False)["input_ids"] if piece else []
            else:
                text = literals[int(piece)]
                ids += self.hf(text, add_special_tokens=False, split_special_tokens=True)[
                    "input_ids"
                ]
        return ids

    def _shield_all(self, value: Any, nonce: str, literals: list[str]) -> Any:
        """`value` (a message, a tool: nested dicts and lists) with `_shield` applied to every
        string in it (not to keys)."""
        if isinstance(value, str):
            return self._shield(value, nonce, literals)
        if isinstance(value, dict):
            return {k: self._shield_all(v, nonce, literals) for k, v in value.items()}
        if isinstance(value, list):
            return [self._shield_all(v, nonce, literals) for v in value]
        return value

    def _shield(self, text: str, nonce: str, literals: list[str]) -> str:
        """`text` with every span the tokenizer would read as a special token replaced by a
        sentinel; the spans are appended to `literals`."""
        if not any(c in text for c in self._special_starts):
            return text
        enc = self.hf.backend_tokenizer.encode(text, add_special_tokens=False)
        out, last = [], 0
        for token_id, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            if token_id in self._special:
                out.append(text[last:start])
                out.append(f"\ue000{nonce}{len(literals)}\ue001")
                literals.append(text[start:end])
                last = end
        out.append(text[last:])
        return "".join(out)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def bos_id(self) -> int:
        """The id every prompt starts with (Gemma's <bos>)."""
        bos = self.hf.bos_token_id
        if bos is None:
            raise TokenizerError("this checkpoint's tokenizer has no BOS token")
        return int(bos)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)


def _stop_ids(folder: Path, hf: Any) -> tuple[int, ...]:
    """End-of-generation ids: generation_config.json's eos ids (Gemma: <eos> and
    <end_of_turn>), else the tokenizer's eos."""
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
    if not ids and hf.eos_token_id is not None:
        ids = [hf.eos_token_id]
    return tuple(ids)


def _max_token_chars(hf: Any) -> int | None:
    """The most characters of input one token can stand for, when the tokenizer makes that
    knowable: a BPE with byte fallback (unknown text becomes one token per byte, never a fused
    <unk>) whose normalizer at most swaps spaces for "▁" one for one, as Gemma's does. Then a
    text of c characters has at least c / this many tokens, so a prompt can be refused for
    length before it is tokenized. None otherwise (no such bound is used)."""
    backend = hf.backend_tokenizer
    config = json.loads(backend.to_str())
    normalizer, model = config.get("normalizer"), config.get("model") or {}
    one_for_one = normalizer is None or (
        normalizer.get("type") == "Replace" and len(normalizer.get("content", "")) == 1
    )
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not one_for_one:
        return None
    pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
    return max((len(p) for p in pieces if p), default=1)
