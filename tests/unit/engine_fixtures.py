"""Plain-Python fixtures for engine unit tests: a small Gemma-3n-shaped config and its subnets."""

from __future__ import annotations

import itertools

from server.engine.kv_blocks import BlockManager, KVLayout
from server.engine.request import Request
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.subnets import Subnet, make_subnet
from server.vocabulary.text_config import TextConfig, text_config_from_dict

SMALL = {
    "model_type": "gemma3n_text",
    "vocab_size": 768,
    "vocab_size_per_layer_input": 512,
    "hidden_size": 64,
    "hidden_size_per_layer_input": 16,
    "intermediate_size": 256,
    "num_hidden_layers": 35,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "altup_num_inputs": 4,
    "laurel_rank": 8,
    "num_kv_shared_layers": 15,
    "sliding_window": 32,
}


def small_text() -> TextConfig:
    return text_config_from_dict(SMALL)


def subnet(
    text: TextConfig, name: str = "full", skip: tuple[int, ...] = (), width: int = 256
) -> Subnet:
    layers = [i for i in range(text.num_hidden_layers) if i not in skip]
    return make_subnet(text, name, layers, [width] * len(layers))


def layout(text: TextConfig) -> KVLayout:
    n = text.first_kv_shared_layer
    sliding = frozenset(i for i in range(n) if text.is_sliding(i))
    return KVLayout(n, sliding, text.sliding_window)


def blocks(
    text: TextConfig, num_blocks: int, block_size: int = 8, cache: bool = True
) -> BlockManager:
    return BlockManager(num_blocks, block_size, layout(text), cache)


_ids = itertools.count()


def request(sn: Subnet, prompt: list[int], max_tokens: int = 8, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(kw.pop("request_id", f"r{next(_ids)}"), list(prompt), sn, params, **kw)
