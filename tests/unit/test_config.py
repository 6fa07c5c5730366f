"""server/config.py: the `concentric serve` settings (plain Python, no torch).

Proves: the defaults; reading a YAML file; unknown keys (file or environment) are errors that name
them; values of the wrong type are errors (file values are checked as YAML types, never
converted; env and flag strings are converted); CONCENTRIC_* variables override the file and
flags override both; relative paths resolve against the file's folder (file), the working
directory (env, flags) or configs/ (defaults); and the cross-field checks.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from server.config import (
    DEFAULT_CONFIG,
    REPO,
    ConfigError,
    ServerConfig,
    add_flags,
    flag_overrides,
    load_config,
)


def _yaml(tmp_path: Path, text: str, name: str = "server.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    config = load_config(_yaml(tmp_path, ""), env={})
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        if f.name not in ("custom_subnets", "tenants_file", "tiers_file", "subnet_table"):
            assert getattr(config, f.name) == getattr(defaults, f.name), f.name
    assert config.port == 8000 and config.host == "127.0.0.1"
    assert config.checkpoint is None and config.open is False and config.metrics_open is True
    # Default paths are the repository's configs/.
    assert config.custom_subnets == str(REPO / "configs" / "subnets" / "custom.yaml")
    assert config.tenants_file == str(REPO / "configs" / "tenants.yaml")
    assert config.tiers_file == str(REPO / "configs" / "tiers.yaml")
    assert config.subnet_table == str(REPO / "configs" / "subnets" / "gemma3n-e4b.csv")


def test_repository_config_loads() -> None:
    config = load_config(DEFAULT_CONFIG, env={})
    assert config == load_config(None, env={})  # the default file when none is given
    assert config.kv_cache_bytes == 256 * 1024 * 1024


def test_yaml_values(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "port: 9001\nkv_cache_bytes: 1024\nopen: true\ndrain_timeout_s: 5\n"
        "max_model_len: 512\nmodel_name: none\nlog_level: debug\n",
    )
    config = load_config(path, env={})
    assert config.port == 9001 and config.kv_cache_bytes == 1024 and config.open is True
    assert config.drain_timeout_s == 5.0 and isinstance(config.drain_timeout_s, float)
    assert config.max_model_len == 512 and config.log_level == "debug"
    # A model named "none" is a name: only YAML null is null in a file.
    assert config.model_name == "none"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus: 1\n", "unknown setting(s): bogus"),
        ("port: 1\nzeta: 2\nalpha: 3\n", "unknown setting(s): alpha, zeta"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("port: [\n", "not valid YAML"),
    ],
)
def test_file_errors_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(_yaml(tmp_path, text), env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("port: abc", "port must be int, got 'abc'"),
        ('port: "8000"', "port must be int, got '8000'"),  # a string, even if it reads as one
        ("port: true", "port must be int, got True"),
        ("max_n: 4.0", "max_n must be int, got 4.0"),
        ("kv_cache_bytes: 1.5", "kv_cache_bytes must be int"),
        ('open: "yes"', "open must be bool, got 'yes'"),
        ("open: 1", "open must be bool, got 1"),
        ('drain_timeout_s: "5"', "drain_timeout_s must be float"),
        ("device: 5", "device must be str, got 5"),
        ("port: null", "port may not be empty"),
    ],
)
def test_file_wrong_types(tmp_path: Path, line: str, fragment: str) -> None:
    path = _yaml(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)  # says where


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("port: 0", "port must be in 1..65535"),
        ("port: 70000", "port must be in 1..65535"),
        ("block_size: 0", "block_size must be at least 1"),
        ("max_model_len: 0", "max_model_len must be at least 1"),
        ("drain_timeout_s: -1", "drain_timeout_s must be >= 0"),
        ("dtype: int8", "dtype must be"),
        ("ffn_mode: fast", "ffn_mode must be"),
        ("log_level: loud", "log_level must be"),
        ("max_num_seqs: 64\nmax_num_batched_tokens: 32", "max_num_batched_tokens must be >="),
        ("paged_attention: true", "paged_attention needs compile: true"),
    ],
)
def test_value_checks(tmp_path: Path, line: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(_yaml(tmp_path, line + "\n"), env={})


def test_env_overrides_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "port: 9001\nopen: false\n")
    env = {
        "CONCENTRIC_PORT": "9002",
        "CONCENTRIC_OPEN": "yes",
        "CONCENTRIC_MAX_MODEL_LEN": "none",
        "CONCENTRIC_DRAIN_TIMEOUT_S": "2.5",
        "CONCENTRIC_CACHE": "/somewhere",  # not a setting: the dev-model cache
        "CONCENTRIC_API_KEY": "sk-x",  # not a setting either
        "PORT": "1",  # not ours
    }
    config = load_config(path, env=env)
    assert config.port == 9002 and config.open is True
    assert config.max_model_len is None and config.drain_timeout_s == 2.5


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CONCENTRIC_BOGUS": "1"}, "unknown setting CONCENTRIC_BOGUS"),
        ({"CONCENTRIC_PORT": "80.5"}, "CONCENTRIC_PORT: port must be int"),
        ({"CONCENTRIC_PORT": "many"}, "port must be int, got 'many'"),
        ({"CONCENTRIC_OPEN": "maybe"}, "open must be bool"),
        ({"CONCENTRIC_PORT": ""}, "port may not be empty"),
    ],
)
def test_env_errors(tmp_path: Path, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(_yaml(tmp_path, ""), env=env)


def test_flags_override_env_and_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "port: 9001\nmax_n: 2\nlog_level: debug\n")
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--port", "9003", "--no-metrics-open", "--kv-cache-bytes", "4096"])
    overrides = flag_overrides(args)
    assert overrides == {"port": "9003", "metrics_open": False, "kv_cache_bytes": "4096"}
    config = load_config(path, env={"CONCENTRIC_PORT": "9002", "CONCENTRIC_MAX_N": "3"})
    assert config.port == 9002 and config.max_n == 3  # env over file
    config = load_config(
        path, env={"CONCENTRIC_PORT": "9002", "CONCENTRIC_MAX_N": "3"}, overrides=overrides
    )
    assert config.port == 9003  # flag over env over file
    assert config.max_n == 3  # env over file, no flag
    assert config.log_level == "debug"  # file, nothing over it
    assert config.metrics_open is False and config.kv_cache_bytes == 4096
    with pytest.raises(ConfigError, match="--port: port must be int"):
        load_config(path, env={}, overrides={"port": "x"})
    with pytest.raises(ConfigError, match="unknown setting nope"):
        load_config(path, env={}, overrides={"nope": 1})


def test_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = _yaml(
        folder, "checkpoint: ckpt/tiny\ntenants_file: t.yaml\ntiers_file: /abs/tiers.yaml\n"
    )
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = load_config(path, env={})
    assert config.checkpoint == str(folder / "ckpt" / "tiny")  # the file's folder
    assert config.tenants_file == str(folder / "t.yaml")
    assert config.tiers_file == "/abs/tiers.yaml"  # absolute stays
    assert config.custom_subnets == str(REPO / "configs" / "subnets" / "custom.yaml")  # default
    # From the environment or a flag: the working directory.
    config = load_config(
        path, env={"CONCENTRIC_TENANTS_FILE": "mine.yaml"}, overrides={"checkpoint": "here"}
    )
    assert config.tenants_file == str(cwd / "mine.yaml")
    assert config.checkpoint == str(cwd / "here")
    # A relative config path itself: its folder is taken relative to the working directory.
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("etc/server.yaml"), env={}).checkpoint == str(folder / "ckpt/tiny")


def test_every_serve_flag_says_what_it_does_and_its_default() -> None:
    import argparse

    from server.config import ServerConfig, add_flags, setting_docs

    docs = setting_docs()
    assert set(docs) == {f.name for f in fields(ServerConfig)}, "a setting has no docstring"
    parser = argparse.ArgumentParser()
    add_flags(parser)
    for action in parser._actions:
        if action.dest == "help":
            continue
        doc = docs[action.dest]
        assert doc and doc in action.help, action.dest
        assert "(default: " in action.help and "env CONCENTRIC_" in action.help, action.help
