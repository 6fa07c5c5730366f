"""What a request gets for a sampling field it leaves unset: the model's or OpenAI's defaults.

Owns `SamplingDefaults` and the rule that picks them. As in vLLM (`--generation-config auto`, its
default), the checkpoint's `generation_config.json` supplies the defaults for the fields it names
-- for Gemma 3n top_k 64 and top_p 0.95 -- and OpenAI's defaults fill the rest; a request's own
value always wins. The server setting `sampling_defaults: openai` ignores the file (vLLM's
`--generation-config vllm`).

Read from the file, as vLLM does: temperature, top_k, top_p, min_p, repetition_penalty,
presence_penalty, frequency_penalty. Not read: `do_sample` (vLLM ignores it too: a request asks
for greedy with temperature 0), `max_new_tokens` (the tier's output limit governs max_tokens), and
everything else (token ids, cache settings). A top_k of 0 or below means off, as in HF and vLLM.

Deliberately does not know: files (server/checkpoint/generation_config.py reads them), tensors or
HTTP. Plain Python, like sampling_params.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.vocabulary.sampling_params import SamplingParams, SamplingParamsError

FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
SOURCES = ("generation_config", "openai")


@dataclass(frozen=True)
class SamplingDefaults:
    """The value each sampling field takes when a request leaves it unset. The field defaults
    are OpenAI's (and SamplingParams')."""

    source: str = "openai"  # where the values came from (shown by /v1/models)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any], source: str) -> SamplingDefaults:
        """OpenAI's defaults overridden by the fields `config` (a generation_config.json) names.

        Raises ValueError naming the field when a value is not a number or breaks its rule."""
        values: dict[str, Any] = {}
        for name in FIELDS:
            value = config.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{source}: {name} must be a number, got {value!r}")
            if name == "top_k":
                if value != int(value):
                    raise ValueError(f"{source}: top_k must be an integer, got {value!r}")
                value = max(0, int(value))
            values[name] = value
        defaults = cls(source=source, **values)
        try:
            defaults.params().validate(vocab_size=1)
        except SamplingParamsError as e:
            raise ValueError(f"{source}: {e}") from None
        return defaults

    def params(self, **fields: Any) -> SamplingParams:
        """SamplingParams with these defaults for every sampling field not given (or None)."""
        values = {name: getattr(self, name) for name in FIELDS}
        values.update({k: v for k, v in fields.items() if v is not None})
        return SamplingParams(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
