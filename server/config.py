"""The server configuration: `configs/server.yaml`, overridden by environment and command line.

Owns every setting of `concentric serve`, its default, its type and its check. Precedence, lowest
first: the defaults below, the YAML file, `CONCENTRIC_<KEY>` environment variables, command-line
flags (`--kv-cache-bytes`, ...). An unknown key anywhere is an error that names it; so is a value
of the wrong type. Relative paths in the file are resolved against the file's folder.

Deliberately does not know: tenants and tiers themselves (tenancy.py), or how the server runs.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from policies.subnet_choice import SUBNET_POLICIES
from server.telemetry.headroom import HEADROOM_SOURCES
from server.vocabulary.compute import COMPUTE_DTYPES, FFN_MODE_CHOICES, check_choice
from server.vocabulary.sampling_defaults import SOURCES as SAMPLING_SOURCES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "server.yaml"
ENV_PREFIX = "CONCENTRIC_"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    checkpoint: str | None = None
    """Checkpoint folder; none: the built-in `mini` dev model, made on first use."""
    model_name: str | None = None
    """Base model name in the API; none: the checkpoint folder's name."""
    device: str = "cpu"
    """cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """Compute dtype: auto (as stored), float32, bfloat16, float16 (or float64, for reference
    runs); the list is server/vocabulary/compute.py's."""
    kv_cache_bytes: int = 256 * 1024 * 1024
    """Memory for the KV cache. On an accelerator the residency decision may leave less."""
    block_size: int = 16
    """Positions per KV block."""
    max_num_seqs: int = 32
    """Requests computed in one step at most."""
    max_num_batched_tokens: int = 256
    """Tokens computed in one step at most (the token budget)."""
    max_prefill_chunk: int = 128
    """Prompt tokens one request computes per step at most (chunked prefill)."""
    max_model_len: int | None = None
    """Prompt plus output tokens at most; none: the checkpoint's context length."""
    ffn_mode: str = "auto"
    """Mixed subnets in a step: grouped (a GEMM per FFN width, skipped layers by row index),
    masked (every row at the widest width, masks), or auto (measured per kind of step)."""
    compile: bool = False
    """Compile decode steps (torch.compile, inductor; CUDA graphs on a GPU): one graph per batch
    and context bucket, compiled on first use (minutes on a CPU), every subnet mix served."""
    paged_attention: bool = False
    """Compiled decode steps read each sequence's K/V where the paged cache holds them
    (FlexAttention over the block tables) instead of gathering a copy of its context every
    step. Needs compile. On a CPU no faster and slower to compile (runtime/decode_graph.py)."""
    huge_pages: bool = True
    """On a CPU: the weights copied once, in the compute dtype, into memory backed by 2 MiB
    transparent huge pages, which a step reads faster than the checkpoint's 4 KiB page-cache
    pages (private memory the size of the weights; the PLE table stays mapped). Ignored on
    accelerators; a warning, and 4 KiB pages, where the kernel has huge pages off."""
    sampling_defaults: str = "generation_config"
    """What a request gets for sampling fields it leaves unset: generation_config (the
    checkpoint's generation_config.json over OpenAI's defaults, as vLLM does) or openai."""
    batch_invariant: bool = False
    """Every request's logits are exactly what it gets alone, whatever it is batched with (a
    greedy request gives the same tokens under any load): products row by row, attention per
    query, mixed widths grouped. Costs throughput (benchmarks/bench_batch_invariant.py); not
    with compile."""
    custom_subnets: str | None = "subnets/custom.yaml"
    """Custom subnets YAML (relative to this file); none: official subnets only."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """TCP port to listen on."""
    tenants_file: str | None = "tenants.yaml"
    """Tenants and their API keys (as SHA-256 hashes or environment variable names)."""
    tiers_file: str | None = "tiers.yaml"
    """Service tiers: priority, subnets, rate limits, targets."""
    open: bool = False
    """Development mode: no API keys, one default tenant. Never in production."""
    metrics_open: bool = True
    """Serve /metrics without a key (for Prometheus scrapes inside the deployment)."""
    max_body_bytes: int = 1024 * 1024
    """Larger request bodies get 413, counted as the bytes arrive, whatever the headers say."""
    max_prompt_chars: int = 256 * 1024
    """Longer prompt text (a request's messages or prompts together) gets 400 before it is
    tokenized. 256 Ki characters: 32768 tokens (the default tier's max_prompt_tokens) at 8
    characters per token, twice what English or code averages."""
    tokenizer_threads: int = 2
    """Threads that tokenize prompts, shared by all tenants; one tenant uses at most half."""
    keep_alive_timeout_s: float = 5.0
    """An idle connection (no request in progress) is closed after this long."""
    header_timeout_s: float = 10.0
    """A request's headers must arrive within this long of its first byte (else 408, closed)."""
    body_timeout_s: float = 30.0
    """A request's body must arrive within this long of its headers (else 408, closed)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish; then they are cut short."""
    max_n: int = 8
    """The most choices (`n`) one request may ask for."""
    subnet_policy: str = "sla"
    """How the server chooses a request's subnet: sla, largest-fits or fixed
    (policies/subnet_choice.py)."""
    fixed_subnet: str = "full"
    """The subnet of the `fixed` policy."""
    subnet_table: str | None = "subnets/gemma3n-e4b.csv"
    """Google's official subnet table (relative to this file); none: only full and custom."""
    memory_budget_bytes: int | None = None
    """On a CPU: the memory budget the resident widths follow (none: they stay full). On an
    accelerator NVML reports the device's memory instead."""
    low_water_bytes: int = 1024**3
    """Shrink the resident FFN widths when free accelerator memory falls under this."""
    high_water_bytes: int = 2 * 1024**3
    """Grow them back when free memory exceeds this plus what growing one level holds at its
    peak (the grown layers' new rows beside the old, until the swap)."""
    probe_interval_s: float = 0.5
    """How often free memory is read (and at once after every resize)."""
    headroom_source: str = "auto"
    """Where free memory is read: nvml (the accelerator, by its UUID), host (memory_budget_bytes
    against this process's memory), none (no readings: only out-of-memory errors shrink), or
    auto (nvml on CUDA, failing at start if NVML does not answer; host elsewhere)."""
    oom_cooldown_s: float = 30.0
    """After an out-of-memory error shrank the resident widths, no growing for this long."""
    grow_backoff_s: float = 30.0
    """After a background grow failed, no growing for this long (doubling, up to 10 minutes)."""
    calibrate: bool = True
    """Time a few steps of the smallest and largest subnet at start, to seed the cost model."""
    log_level: str = "info"
    """Logging level: debug, info, warning, error."""
    tool_chat_template: str | None = None
    """Jinja chat template for requests with tools (relative to this file); none: the built-in
    server/api/tool_chat_template.jinja (README, "Tool calls")."""

    def __post_init__(self) -> None:
        positive = (
            "kv_cache_bytes",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_prefill_chunk",
            "max_body_bytes",
            "max_n",
            "max_prompt_chars",
            "tokenizer_threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be at least 1")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.drain_timeout_s < 0:
            raise ConfigError("drain_timeout_s must be >= 0")
        for name in ("keep_alive_timeout_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for setting, choices in (
            ("dtype", COMPUTE_DTYPES),
            ("ffn_mode", FFN_MODE_CHOICES),
            ("subnet_policy", tuple(SUBNET_POLICIES)),
            ("sampling_defaults", SAMPLING_SOURCES),
        ):
            try:
                check_choice(setting, getattr(self, setting), choices)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.low_water_bytes < 0 or self.high_water_bytes < self.low_water_bytes:
            raise ConfigError("need 0 <= low_water_bytes <= high_water_bytes")
        if self.probe_interval_s <= 0:
            raise ConfigError("probe_interval_s must be positive")
        if self.headroom_source not in HEADROOM_SOURCES:
            raise ConfigError(f"headroom_source must be one of {', '.join(HEADROOM_SOURCES)}")
        if self.oom_cooldown_s < 0 or self.grow_backoff_s < 0:
            raise ConfigError("oom_cooldown_s and grow_backoff_s must be >= 0")
        if self.batch_invariant and self.compile:
            raise ConfigError("batch_invariant and compile exclude each other (compiled steps pad)")
        if self.paged_attention and not self.compile:
            raise ConfigError("paged_attention needs compile: true (it is a compiled step's)")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 1:
            raise ConfigError("memory_budget_bytes must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError("max_num_batched_tokens must be >= max_num_seqs")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")


_FIELDS = {f.name: f for f in fields(ServerConfig)}
_PATH_KEYS = (
    "checkpoint",
    "custom_subnets",
    "tenants_file",
    "tiers_file",
    "subnet_table",
    "tool_chat_template",
)
# CONCENTRIC_* variables that are not settings (read elsewhere: the dev-model cache, API keys).
_ENV_NOT_SETTINGS = {"CONCENTRIC_CACHE", "CONCENTRIC_API_KEY"}


def _coerce(name: str, value: Any, source: str, from_file: bool = False) -> Any:
    """Check (file values: YAML has types, so a quoted "8000" is a string, not a port) or
    convert (env and flag strings) one value to the field's type."""
    kind = _FIELDS[name].type
    optional = "None" in str(kind)
    if value is None or (
        not from_file and isinstance(value, str) and value.lower() in ("null", "none", "")
    ):
        if optional:
            return None
        raise ConfigError(f"{source}: {name} may not be empty")
    base = str(kind).replace(" | None", "")
    try:
        if from_file:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = {
                "bool": isinstance(value, bool),
                "int": number and isinstance(value, int),
                "float": number,
                "str": isinstance(value, str),
            }[base]
            if not ok:
                raise ValueError
            return float(value) if base == "float" else value
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {base}, got {value!r}") from None


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Defaults < `path` (YAML; default configs/server.yaml if it exists) < env < overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    # Relative paths: from the file, against its folder; from env or flags, against the working
    # directory; the defaults, against the repository's configs/ folder.
    path_base = {name: REPO / "configs" for name in _PATH_KEYS}
    if path and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    file = Path(path) if path else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if file is not None:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of settings")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{file}: unknown setting(s): {', '.join(map(str, unknown))}")
        for k, v in data.items():
            values[k] = _coerce(k, v, str(file), from_file=True)
            path_base[k] = file.parent
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in _ENV_NOT_SETTINGS:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _FIELDS:
            raise ConfigError(f"environment: unknown setting {key}")
        values[name] = _coerce(name, value, f"environment {key}")
        path_base[name] = Path.cwd()
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name}")
        if value is not None:
            values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
            path_base[name] = Path.cwd()
    for name in _PATH_KEYS:
        value = values.get(name, getattr(ServerConfig, name))
        if value is not None and not Path(value).expanduser().is_absolute():
            value = str((path_base[name] / Path(value).expanduser()).resolve())
        values[name] = value
    return ServerConfig(**values)


def setting_docs() -> dict[str, str]:
    """Each setting's docstring (the string under its field in `ServerConfig`), one line."""
    tree = ast.parse(inspect.getsource(ServerConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for field_node, doc in itertools.pairwise(body):
        if (
            isinstance(field_node, ast.AnnAssign)
            and isinstance(field_node.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field_node.target.id] = " ".join(doc.value.value.split())
    return docs


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, each defaulting to None (= not given), its help the setting's
    docstring, its default and its environment variable."""
    docs = setting_docs()
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = "none" if f.default is None else f.default
        help_text = (
            f"{docs.get(f.name, '')} (default: {default}, unless the config file sets it; "
            f"env {ENV_PREFIX}{f.name.upper()})"
        ).replace("%", "%%")
        if str(f.type) == "bool":
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text
            )


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        f.name: getattr(args, f.name)
        for f in fields(ServerConfig)
        if getattr(args, f.name, None) is not None
    }
