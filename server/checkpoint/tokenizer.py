"""The checkpoint's tokenizer and chat template, behind a small interface of token ids.

Owns loading the tokenizer files of a checkpoint folder (transformers' AutoTokenizer, which reads
`tokenizer.json` and `chat_template.jinja`), turning raw text or chat messages into prompt ids, and
ids back into text. Everything past this point sees token ids only.

Deliberately does not know: models, subnets, sampling, or incremental (streaming) detokenization.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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

    def encode(self, text: str) -> list[int]:
        """Raw text, with the BOS the tokenizer adds (no chat template)."""
        return list(self.hf(text)["input_ids"])

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Chat messages through the checkpoint's template (which writes the BOS itself)."""
        if not self.hf.chat_template:
            raise TokenizerError("this checkpoint's tokenizer has no chat template")
        try:
            prompt = self.hf.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja's raise_exception and template errors
            raise TokenizerError(f"chat template rejected the messages: {e}") from None
        return list(self.hf(prompt, add_special_tokens=False)["input_ids"])

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
