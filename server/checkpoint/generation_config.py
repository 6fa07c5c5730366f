"""A checkpoint's `generation_config.json`, read for the sampling defaults it sets.

Owns reading the file (absent: OpenAI's defaults; unreadable or invalid: an error naming it).
The rule for which fields count lives in server/vocabulary/sampling_defaults.py.

Deliberately does not know: how requests use the defaults, or the eos ids (tokenizer.py reads
those from the same file).
"""

from __future__ import annotations

import json
from pathlib import Path

from server.vocabulary.sampling_defaults import SOURCES, SamplingDefaults

FILE = "generation_config.json"


def sampling_defaults(folder: str | Path, source: str = "generation_config") -> SamplingDefaults:
    """The defaults in force for a checkpoint folder: its generation_config.json's sampling
    fields over OpenAI's (`source` "generation_config"), or OpenAI's alone ("openai")."""
    if source not in SOURCES:
        raise ValueError(f"sampling defaults must come from one of {SOURCES}, not {source!r}")
    path = Path(folder) / FILE
    if source == "openai" or not path.is_file():
        return SamplingDefaults()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return SamplingDefaults.from_generation_config(config, source=str(path.name))
