"""The Gemma 3n text decoder's configuration, read from a checkpoint's `config.json`.

Owns: parsing the multimodal layout (`text_config` inside a `Gemma3nConfig`) and the flat text-only
layout, checking that the Gemma 3n fields are there and consistent, and the facts derived from them
(layer types, which layers own a KV cache and which reuse another's, the expected shape of every
text-decoder tensor). Plain Python: no torch, so the subnet table and the tests of parameter
counts can use it without a model.

Deliberately does not know: where tensors live, subnets, or how the forward pass runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"

# Fields a Gemma 3n text config must carry; without them this is not a Gemma 3n checkpoint and
# defaults would silently describe a different model.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size_per_layer_input",
    "vocab_size_per_layer_input",
    "altup_num_inputs",
    "laurel_rank",
    "num_kv_shared_layers",
)


class ConfigError(ValueError):
    """A config.json that does not describe a Gemma 3n text decoder we can run."""


@dataclass(frozen=True)
class TextConfig:
    """Every number the text decoder needs; field names follow `Gemma3nTextConfig`."""

    vocab_size: int  # rows of embed_tokens / the tied LM head (text + vision + audio ids)
    vocab_size_per_layer_input: int  # rows of the PLE table; other ids look up row 0
    hidden_size: int
    hidden_size_per_layer_input: int  # PLE width per layer
    intermediate_size: tuple[int, ...]  # full FFN width of each layer
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_theta_full: float
    rope_theta_sliding: float
    rms_norm_eps: float
    final_logit_softcapping: float | None
    altup_num_inputs: int
    altup_active_idx: int
    altup_coef_clip: float | None
    altup_correct_scale: bool
    laurel_rank: int
    num_kv_shared_layers: int
    activation_sparsity_pattern: tuple[float, ...]
    hidden_activation: str
    tie_word_embeddings: bool
    max_position_embeddings: int
    pad_token_id: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]

    # ---- derived facts ----------------------------------------------------------------------

    @property
    def first_kv_shared_layer(self) -> int:
        """Layers from here on compute only queries and reuse a producer's K/V (20 in E4B)."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    def owns_kv(self, layer: int) -> bool:
        return layer < self.first_kv_shared_layer

    def kv_source(self, layer: int) -> int:
        """The layer whose K/V this layer attends over: itself, or for a consumer the last
        layer of the same type before the shared range (18 sliding / 19 full in E4B)."""
        if self.owns_kv(layer):
            return layer
        kind = self.layer_types[layer]
        for j in range(self.first_kv_shared_layer - 1, -1, -1):
            if self.layer_types[j] == kind:
                return j
        raise ConfigError(f"layer {layer} ({kind}) has no KV producer of its type")

    @property
    def kv_producers(self) -> tuple[int, ...]:
        """Layers whose K/V some consumer reuses; a subnet can never skip them."""
        return tuple(
            sorted(
                {
                    self.kv_source(i)
                    for i in range(self.first_kv_shared_layer, self.num_hidden_layers)
                }
            )
        )

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def full_width(self) -> int:
        """The widest FFN of any layer (16384 in E4B): the scale of the official subnet table."""
        return max(self.intermediate_size)

    # ---- tensor inventory -------------------------------------------------------------------

    def global_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Text-decoder tensors that are not per layer, by name relative to the text prefix."""
        h, d, n = self.hidden_size, self.hidden_size_per_layer_input, self.num_hidden_layers
        shapes: dict[str, tuple[int, ...]] = {
            "embed_tokens.weight": (self.vocab_size, h),
            "embed_tokens_per_layer.weight": (self.vocab_size_per_layer_input, n * d),
            "per_layer_model_projection.weight": (n * d, h),
            "per_layer_projection_norm.weight": (d,),
            "norm.weight": (h,),
        }
        for i in range(self.altup_num_inputs - 1):
            shapes[f"altup_projections.{i}.weight"] = (h, h)
            shapes[f"altup_unembed_projections.{i}.weight"] = (h, h)
        return shapes

    def layer_tensor_shapes(
        self, layer: int, ffn_width: int | None = None
    ) -> dict[str, tuple[int, ...]]:
        """Tensors of one decoder layer the forward pass reads, by name relative to
        `layers.{layer}.`. Consumer layers' k/v projections and k_norm are left out: they are
        never used (transformers 5 does not even instantiate them)."""
        h, d, a = self.hidden_size, self.hidden_size_per_layer_input, self.altup_num_inputs
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        k = self.intermediate_size[layer] if ffn_width is None else ffn_width
        shapes: dict[str, tuple[int, ...]] = {
            "self_attn.q_proj.weight": (q_out, h),
            "self_attn.o_proj.weight": (h, q_out),
            "self_attn.q_norm.weight": (self.head_dim,),
            "mlp.gate_proj.weight": (k, h),
            "mlp.up_proj.weight": (k, h),
            "mlp.down_proj.weight": (h, k),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "pre_feedforward_layernorm.weight": (h,),
            "post_feedforward_layernorm.weight": (h,),
            "altup.correct_output_scale": (h,),
            "altup.correction_coefs.weight": (a, a),
            "altup.prediction_coefs.weight": (a * a, a),
            "altup.modality_router.weight": (a, h),
            "altup.router_norm.weight": (h,),
            "laurel.linear_left.weight": (self.laurel_rank, h),
            "laurel.linear_right.weight": (h, self.laurel_rank),
            "laurel.post_laurel_norm.weight": (h,),
            "per_layer_input_gate.weight": (d, h),
            "per_layer_projection.weight": (h, d),
            "post_per_layer_input_norm.weight": (h,),
        }
        if self.owns_kv(layer):
            shapes["self_attn.k_proj.weight"] = (kv_out, h)
            shapes["self_attn.v_proj.weight"] = (kv_out, h)
            shapes["self_attn.k_norm.weight"] = (self.head_dim,)
        return shapes

    def dead_kv_tensor_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """The k/v tensors a real checkpoint still stores for a consumer layer (never read)."""
        if self.owns_kv(layer):
            return {}
        h, kv_out = self.hidden_size, self.num_key_value_heads * self.head_dim
        return {
            "self_attn.k_proj.weight": (kv_out, h),
            "self_attn.v_proj.weight": (kv_out, h),
            "self_attn.k_norm.weight": (self.head_dim,),
        }


# ---- reading config.json --------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointConfig:
    """What config.json says about the checkpoint as a whole."""

    text: TextConfig
    multimodal: (
        bool  # True: a Gemma3nConfig with `text_config` (tensors under model.language_model.)
    )
    raw: dict[str, Any]  # the file as read, for export

    @property
    def text_prefix(self) -> str:
        return "model.language_model." if self.multimodal else "model."


def read_checkpoint_config(folder: Path) -> CheckpointConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if "text_config" in raw:
        if not isinstance(raw["text_config"], dict):
            raise ConfigError(f"{path}: text_config is not an object")
        return CheckpointConfig(text_config_from_dict(raw["text_config"], path), True, raw)
    return CheckpointConfig(text_config_from_dict(raw, path), False, raw)


def text_config_from_dict(cfg: dict[str, Any], where: Path | str = "config") -> TextConfig:
    """Validate and normalise a Gemma 3n text config dict (E4B defaults never fill in gaps)."""
    model_type = cfg.get("model_type")
    if model_type not in (None, "gemma3n_text", "gemma3n"):
        raise ConfigError(f"{where}: model_type is {model_type!r}, not a Gemma 3n text config")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"{where}: not a Gemma 3n config, missing fields: {', '.join(missing)}")

    def as_int(key: str, minimum: int = 1) -> int:
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"{where}: {key} must be an integer >= {minimum}, got {v!r}")
        return v

    n = as_int("num_hidden_layers")
    width = cfg["intermediate_size"]
    widths = [width] * n if isinstance(width, int) else list(width)
    if len(widths) != n or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ConfigError(
            f"{where}: intermediate_size must be a positive integer or a list of {n} of them"
        )

    layer_types = cfg.get("layer_types") or [
        FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)
    ]
    if len(layer_types) != n:
        raise ConfigError(
            f"{where}: layer_types has {len(layer_types)} entries for {n} layers "
            "(an unfiltered MatFormer Lab export?)"
        )
    if any(t not in (FULL, SLIDING) for t in layer_types):
        raise ConfigError(f"{where}: layer_types may hold only {FULL!r} and {SLIDING!r}")

    sparsity = cfg.get("activation_sparsity_pattern")
    if sparsity is None:
        sparsity = [0.95] * min(10, n) + [0.0] * max(0, n - 10)
    if isinstance(sparsity, (int, float)):
        sparsity = [float(sparsity)] * n
    if len(sparsity) != n or not all(0.0 <= float(p) < 1.0 for p in sparsity):
        raise ConfigError(f"{where}: activation_sparsity_pattern needs {n} values in [0, 1)")

    theta_full, theta_sliding = _rope_thetas(cfg, where)

    if cfg.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=True is not part of Gemma 3n")
    activation = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}: hidden_activation {activation!r} is not supported")

    eos = cfg.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    for key, default in (
        ("pad_token_id", 0),
        ("bos_token_id", 2),
        ("sliding_window", 512),
        ("max_position_embeddings", 32768),
    ):
        value = cfg.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: {key} must be a non-negative integer, got {value!r}")
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
        raise ConfigError(f"{where}: eos_token_id must be an integer or a list of them")
    softcap = cfg.get("final_logit_softcapping", 30.0)

    text = TextConfig(
        vocab_size=as_int("vocab_size"),
        vocab_size_per_layer_input=as_int("vocab_size_per_layer_input"),
        hidden_size=as_int("hidden_size"),
        hidden_size_per_layer_input=as_int("hidden_size_per_layer_input"),
        intermediate_size=tuple(widths),
        num_hidden_layers=n,
        num_attention_heads=as_int("num_attention_heads"),
        num_key_value_heads=as_int("num_key_value_heads"),
        head_dim=as_int("head_dim"),
        layer_types=tuple(layer_types),
        sliding_window=int(cfg.get("sliding_window", 512)),
        rope_theta_full=theta_full,
        rope_theta_sliding=theta_sliding,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=None if softcap is None else float(softcap),
        altup_num_inputs=as_int("altup_num_inputs", 2),
        altup_active_idx=int(cfg.get("altup_active_idx", 0)),
        altup_coef_clip=cfg.get("altup_coef_clip", 120.0),
        altup_correct_scale=bool(cfg.get("altup_correct_scale", True)),
        laurel_rank=as_int("laurel_rank"),
        num_kv_shared_layers=as_int("num_kv_shared_layers", 0),
        activation_sparsity_pattern=tuple(float(p) for p in sparsity),
        hidden_activation=activation,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        pad_token_id=int(cfg.get("pad_token_id", 0)),
        bos_token_id=int(cfg.get("bos_token_id", 2)),
        eos_token_ids=tuple(int(e) for e in eos_ids),
    )
    _check_consistency(text, where)
    return text


def _rope_thetas(cfg: dict[str, Any], where: Path | str) -> tuple[float, float]:
    """RoPE bases for full and sliding layers, from 5.x `rope_parameters` or 4.x legacy keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:
        full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
        for kind, p in ((FULL, full), (SLIDING, sliding)):
            if p.get("rope_type", "default") != "default":
                raise ConfigError(
                    f"{where}: rope_type {p['rope_type']!r} ({kind}) is not supported"
                )
        return float(full.get("rope_theta", 1e6)), float(sliding.get("rope_theta", 1e4))
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"{where}: rope_scaling {scaling!r} is not supported")
    return float(cfg.get("rope_theta", 1e6)), float(cfg.get("rope_local_base_freq", 1e4))


def _check_consistency(t: TextConfig, where: Path | str) -> None:
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    if t.head_dim % 2:
        raise ConfigError(f"{where}: head_dim must be even for rotary embeddings")
    if not 0 <= t.num_kv_shared_layers < t.num_hidden_layers:
        raise ConfigError(f"{where}: num_kv_shared_layers must leave at least one KV-owning layer")
    if not 0 <= t.altup_active_idx < t.altup_num_inputs:
        raise ConfigError(f"{where}: altup_active_idx out of range")
    if t.vocab_size_per_layer_input > t.vocab_size:
        raise ConfigError(f"{where}: vocab_size_per_layer_input exceeds vocab_size")
    owned = set(t.layer_types[: t.first_kv_shared_layer])
    for i in range(t.first_kv_shared_layer, t.num_hidden_layers):
        if t.layer_types[i] not in owned:
            raise ConfigError(
                f"{where}: layer {i} ({t.layer_types[i]}) reuses KV but no earlier layer of "
                "that type owns one"
            )
