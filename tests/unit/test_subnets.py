"""The subnet table: official CSV, custom YAML, validation, parameter counts and KV layout keys.

Plain Python: parameter counts come from the E4B config dict alone, no weights and no torch.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.vocabulary.subnets import (
    DEFAULT_CUSTOM_YAML,
    DEFAULT_TABLE_CSV,
    SubnetError,
    SubnetTable,
    effective_params,
    format_table,
    kv_layout_key,
    load_subnet_table,
    make_subnet,
    official_slug,
    parse_official_csv,
)
from server.vocabulary.text_config import TextConfig, text_config_from_dict

REPO = Path(__file__).resolve().parents[2]

# All Gemma3nTextConfig defaults, i.e. the real E4B text decoder.
E4B: dict[str, Any] = {
    "vocab_size": 262400,
    "vocab_size_per_layer_input": 262144,
    "hidden_size": 2048,
    "hidden_size_per_layer_input": 256,
    "intermediate_size": 16384,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "altup_num_inputs": 4,
    "laurel_rank": 64,
    "num_kv_shared_layers": 15,
}
# E4B's topology (35 layers, KV producers 18/19) at toy sizes, full FFN width 256.
SMALL: dict[str, Any] = E4B | {
    "vocab_size": 64,
    "vocab_size_per_layer_input": 32,
    "hidden_size": 32,
    "hidden_size_per_layer_input": 8,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "laurel_rank": 4,
}
OFFICIAL_SLUGS = [
    "full",
    "e2b",
    "e1.96b-layer",
    "e2.54b-layer",
    "e2.69b-layer",
    "e2.98b-layer",
    "e3.18b-layer",
    "e3.39b-layer",
    "e3.59b-layer",
    "e3.79b-layer",
    "e2.49b-block",
    "e2.73b-block",
    "e2.98b-block",
    "e3.24b-block",
    "e3.49b-block",
    "e3.79b-block",
]
E2B_LAYERS = [i for i in range(35) if not 20 <= i <= 24]


@pytest.fixture(scope="module")
def e4b() -> TextConfig:
    return text_config_from_dict(E4B)


@pytest.fixture(scope="module")
def small() -> TextConfig:
    return text_config_from_dict(SMALL)


def write_yaml(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def custom(text: TextConfig, tmp_path: Path, *entries: dict[str, Any]) -> SubnetTable:
    return load_subnet_table(text, None, write_yaml(tmp_path, {"subnets": list(entries)}))


# ---- official CSV -----------------------------------------------------------------------------


def test_parse_official_csv() -> None:
    rows = parse_official_csv(DEFAULT_TABLE_CSV)
    assert [r.name for r in rows] == OFFICIAL_SLUGS
    main, e2b, e196 = rows[0], rows[1], rows[2]
    assert (main.title, main.quality, main.params_b) == ("Main model", 62.3, 3.98)
    assert main.layers == tuple(range(35)) and set(main.widths) == {16384}
    assert e2b.title == "Config for official E2B Model" and e2b.quality == 50.9
    assert list(e2b.layers) == E2B_LAYERS and set(e2b.widths) == {8192}
    assert len(e196.widths) == 30 and e196.widths[4] == 16384
    assert sum(w == 16384 for w in e196.widths) == 1
    # Names are labels: the block-level "E3.79B" states 3.74 B.
    assert rows[-1].title == "Config for E3.79B (block-level)" and rows[-1].params_b == 3.74


def test_official_slug_rule() -> None:
    assert official_slug("Main model") == "full"
    assert official_slug("Config for official E2B Model") == "e2b"
    assert official_slug("Config for E9.99B (block-level)") == "e9.99b-block"
    with pytest.raises(SubnetError, match=r"'Something else'.*size label"):
        official_slug("Something else")


FFN_35 = '"[' + ", ".join(["2_048 * 4"] * 35) + ']"'
HEADER = "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("Config for E1B,2,1.0,50%,\"[8, __import__('os')]\",", "is not 'N' or 'A \\* B'"),
        ('Config for E1B,2,1.0,50%,"[2_048 * 4, 8]","[x]"', "skipped layer 'x'"),
        ('Config for E1B,2,1.0,50%,"2_048, 8",', "FFN Hidden Dims is not a"),
        ('Config for E1B,3,1.0,50%,"[8, 8]",', "do not add up"),
        (f"Config for E1B,35,1.0,lots,{FFN_35},", "not a number"),
        (f"Config for E1B,35,?,50%,{FFN_35},", "not a number"),
        ('Config for E1B,2,1.0,50%,"[8, 8]","[20, 20]"', "duplicates"),
    ],
)
def test_malformed_csv_names_the_row(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + row + "\n", encoding="utf-8")
    with pytest.raises(SubnetError, match=rf"'Config for E1B' \(t.csv line 2\).*{message}"):
        parse_official_csv(path)


def test_csv_missing_file_or_columns(tmp_path: Path) -> None:
    with pytest.raises(SubnetError, match="no such file"):
        parse_official_csv(tmp_path / "nope.csv")
    (tmp_path / "t.csv").write_text("name,widths\n", encoding="utf-8")
    with pytest.raises(SubnetError, match="missing columns"):
        parse_official_csv(tmp_path / "t.csv")


# ---- parameter counts and KV layout (E4B) -----------------------------------------------------


def test_e4b_effective_params(e4b: TextConfig) -> None:
    assert effective_params(e4b, range(35), [16384] * 35) == 3_980_491_248
    assert effective_params(e4b, E2B_LAYERS, [8192] * 30) == 1_905_495_648
    table = load_subnet_table(e4b, custom_path=None)
    assert table.full.effective_params == 3_980_491_248
    assert table["e2b"].effective_params == 1_905_495_648
    # The other rows' stated values are up to ~0.02 B above our count (e.g. 2.521 vs 2.54).
    for s in table:
        assert s.table_params_b is not None
        assert abs(s.effective_params / 1e9 - s.table_params_b) < 0.03, s.name


def test_e4b_kv_classes(e4b: TextConfig) -> None:
    classes: dict[str, set[str]] = defaultdict(set)
    for s in load_subnet_table(e4b, custom_path=None):
        classes[s.kv_key].add(s.name)
        assert s.kv_layers == tuple(range(20))
    expected = [
        {"e2b", "e2.49b-block"},
        {"e1.96b-layer", "e2.54b-layer"},
        {"e2.98b-layer", "e2.73b-block"},
        {"e3.18b-layer", "e3.39b-layer"},
        {"e3.59b-layer", "e3.79b-layer"},
        {"e2.98b-block", "e3.24b-block"},
        {"e3.49b-block", "e3.79b-block"},
        {"full"},
        {"e2.69b-layer"},
    ]
    assert sorted(map(sorted, classes.values())) == sorted(map(sorted, expected))


def test_kv_key_ignores_consumer_layers(e4b: TextConfig) -> None:
    key = kv_layout_key(e4b, range(35), [8192] * 35)
    assert key.startswith("kv-") and len(key) == 11
    assert kv_layout_key(e4b, range(30), [8192] * 20 + [16384] * 10) == key
    assert kv_layout_key(e4b, range(35), [8192] * 19 + [16384] * 16) != key


# ---- scaling and when the official rows apply -------------------------------------------------


def test_official_rows_scale_to_checkpoint_width(small: TextConfig) -> None:
    table = load_subnet_table(small, custom_path=None)
    assert table.names() == tuple(OFFICIAL_SLUGS) and not table.notes
    assert table["e2b"].widths == (128,) * 30
    assert table.full.widths == (256,) * 35 and table.full.title == "Main model"
    assert table["e1.96b-layer"].width_of(4) == 256
    assert table["e1.96b-layer"].width_of(5) == 128


def test_scaling_rounds_half_up_and_never_below_one() -> None:
    def e2b_widths(full_width: int) -> set[int]:
        text = text_config_from_dict(SMALL | {"intermediate_size": full_width})
        return set(load_subnet_table(text, custom_path=None)["e2b"].widths)

    assert e2b_widths(3) == {2}  # 8192 * 3 / 16384 = 1.5
    assert e2b_widths(1) == {1}  # 0.5, and never 0
    assert e2b_widths(301) == {151}  # 150.5


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"num_hidden_layers": 30, "num_kv_shared_layers": 10}, "30 layers"),
        ({"num_kv_shared_layers": 14}, "KV producers \\[19, 20\\]"),
        ({"intermediate_size": [256] * 34 + [128]}, "same full FFN width"),
    ],
)
def test_official_rows_left_out_with_a_note(overrides: dict[str, Any], why: str) -> None:
    text = text_config_from_dict(SMALL | overrides)
    table = load_subnet_table(text, custom_path=None)
    assert table.names() == ("full",)
    assert table.full.widths == text.intermediate_size and not table.full.official
    assert len(table.notes) == 1
    assert "official subnets not loaded" in table.notes[0]
    assert re.search(why, table.notes[0])


def test_no_csv_builds_full_from_config(small: TextConfig) -> None:
    table = load_subnet_table(small, None, None)
    assert table.names() == ("full",) and table.full.quality is None
    assert "no table given" in table.notes[0]


# ---- validation -------------------------------------------------------------------------------


ALL = list(range(35))


@pytest.mark.parametrize(
    ("name", "layers", "widths", "message"),
    [
        ("E2B", ALL, [64] * 35, "'E2B': invalid name"),
        ("a b", ALL, [64] * 35, "'a b': invalid name"),
        ("", ALL, [64] * 35, "'': invalid name"),
        ("x", [], [], "'x': keeps no layers"),
        ("x", [*range(34), 34.0], [64] * 35, "'x': kept layers must be integers"),
        ("x", [*range(34), True], [64] * 35, "'x': kept layers must be integers"),
        ("x", [*range(35), 35], [64] * 36, "'x': kept layers: layer 35 is out of range"),
        ("x", [-1, *range(35)], [64] * 36, "'x': kept layers: layer -1 is out of range"),
        ("x", [*range(35), 3], [64] * 36, r"'x': kept layers lists layers more than once: \[3\]"),
        ("x", [*range(34, -1, -1)], [64] * 35, "'x': kept layers must be in ascending order"),
        ("x", [*range(18), *range(19, 35)], [64] * 34, r"'x': skips KV producer layer\(s\) \[18\]"),
        ("x", ALL, [64] * 34, "'x': 34 widths for 35 kept layers"),
        ("x", ALL, [0] * 35, r"'x': layer 0 width 0 is not an integer in \(0, 256\]"),
        ("x", ALL, [257] * 35, r"'x': layer 0 width 257 is not an integer in \(0, 256\]"),
        ("x", ALL, [0.5] * 35, r"'x': layer 0 width 0.5 is not an integer"),
    ],
)
def test_make_subnet_rules(
    small: TextConfig, name: str, layers: list[Any], widths: list[Any], message: str
) -> None:
    with pytest.raises(SubnetError, match=message):
        make_subnet(small, name, layers, widths)


def test_kv_producer_message_says_why(small: TextConfig) -> None:
    with pytest.raises(
        SubnetError, match=r"\[18, 19\].*consumer layers \(20..34\) reuse their K/V"
    ):
        make_subnet(small, "x", range(18), [64] * 18)


def test_subnet_accessors(small: TextConfig) -> None:
    s = make_subnet(small, "x", E2B_LAYERS, [100] * 29 + [7], title="X", quality=50)
    assert s.title == "X" and s.quality == 50 and not s.official and s.table_params_b is None
    assert s.keeps(19) and not s.keeps(20)
    assert s.width_of(0) == 100 and s.width_of(34) == 7 and s.width_of(22) is None
    assert s.skipped(35) == (20, 21, 22, 23, 24)
    assert s.kv_layers == tuple(range(20))


def test_table_names_are_unique(small: TextConfig, tmp_path: Path) -> None:
    entry = {"name": "e2b", "widths": 0.5}
    with pytest.raises(SubnetError, match="'e2b': name already used by an official subnet"):
        load_subnet_table(small, custom_path=write_yaml(tmp_path, {"subnets": [entry]}))
    with pytest.raises(SubnetError, match="'full': name already used"):
        custom(small, tmp_path, {"name": "full", "widths": 1.0})
    with pytest.raises(SubnetError, match="'a': name already used by a custom subnet"):
        custom(small, tmp_path, {"name": "a", "widths": 1.0}, {"name": "a", "widths": 0.5})


def test_table_lookup(small: TextConfig) -> None:
    table = load_subnet_table(small)
    assert "e2b" in table and "nope" not in table and len(table) == len(table.names())
    assert table.get("e2b") is table["e2b"]
    with pytest.raises(SubnetError, match="'nope': unknown; known subnets: full, e2b, "):
        table["nope"]


# ---- custom YAML ------------------------------------------------------------------------------


def test_repo_custom_yaml(e4b: TextConfig, small: TextConfig) -> None:
    for text in (e4b, small):
        table = load_subnet_table(text)
        assert table.names()[: len(OFFICIAL_SLUGS)] == tuple(OFFICIAL_SLUGS)
        full = text.full_width
        mix, skip_high, skip_low = table["mix-0.75"], table["skip-30-33"], table["skip-3-7"]
        assert mix.width_of(0) == full * 3 // 4 and mix.width_of(4) == full
        assert skip_high.skipped(35) == (30, 31, 32, 33)
        assert skip_high.kv_key == table["e2b"].kv_key
        assert skip_low.skipped(35) == (3, 7) and skip_low.width_of(4) == full
        assert skip_low.width_of(5) == full // 2
        official_keys = {s.kv_key for s in table if s.official}
        assert skip_low.kv_key not in official_keys
        assert mix.kv_key not in official_keys
    assert DEFAULT_CUSTOM_YAML.name == "custom.yaml"


def test_custom_fractions_absolute_lists_and_overrides(small: TextConfig, tmp_path: Path) -> None:
    table = custom(
        small,
        tmp_path,
        {"name": "a", "widths": 0.3, "quality": 55, "title": "A", "description": "d"},
        {"name": "b", "keep_layers": [0, 18, 19, 30], "widths": [1, 1.0, 0.5, 200]},
        {"name": "c", "skip_layers": [0], "widths": 64, "overrides": {1: 0.001, 34: 256}},
    )
    a, b, c = table["a"], table["b"], table["c"]
    assert set(a.widths) == {77} and a.quality == 55.0 and a.title == "A"  # 76.8 -> 77
    assert b.layers == (0, 18, 19, 30) and b.widths == (1, 256, 128, 200)
    assert b.kv_layers == (0, 18, 19)
    assert c.width_of(1) == 1 and c.width_of(34) == 256 and c.width_of(2) == 64
    assert not c.keeps(0) and c.title == "c"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x", "widths": 0.5, "skip": [1]}, r"'x': unknown key\(s\) \['skip'\]"),
        ({"name": "x", "widths": 0.5, "overrides": {"four": 1.0}}, "unknown key 'four' in overr"),
        ({"name": "x", "widths": 0.5, "overrides": {20: 1.0}, "skip_layers": [20]}, "not kept"),
        ({"name": "x", "widths": 0.5, "keep_layers": ALL, "skip_layers": [1]}, "not both"),
        ({"name": "x", "widths": 1.5}, r"'x': widths: fraction 1.5 is not in \(0, 1\]"),
        ({"name": "x", "widths": 0.0}, r"fraction 0.0 is not in \(0, 1\]"),
        ({"name": "x", "widths": 0.5, "overrides": {3: -0.5}}, r"overrides\[3\]: fraction -0.5"),
        ({"name": "x", "widths": "wide"}, "'wide' is neither a width nor a fraction"),
        ({"name": "x", "widths": 300}, r"width 300 is not an integer in \(0, 256\]"),
        ({"name": "x", "widths": [0.5] * 3}, "'x': 3 widths for 35 kept layers"),
        ({"name": "x"}, "'x': 'widths' is required"),
        ({"name": "x", "widths": 0.5, "skip_layers": [18]}, r"KV producer layer\(s\) \[18\]"),
        ({"name": "x", "widths": 0.5, "skip_layers": [40]}, "skip_layers: layer 40 is out of r"),
        ({"name": "x", "widths": 0.5, "skip_layers": [1, 1]}, "skip_layers lists layers more"),
        ({"name": "x", "widths": 0.5, "skip_layers": 3}, "layer lists must be lists"),
        ({"name": "x", "widths": 0.5, "quality": "high"}, "quality must be a number"),
        ({"name": "Bad Name", "widths": 0.5}, "'Bad Name': invalid name"),
        ({"widths": 0.5}, "custom subnet #1: must be a mapping with a 'name'"),
    ],
)
def test_custom_rules(small: TextConfig, tmp_path: Path, entry: Any, message: str) -> None:
    with pytest.raises(SubnetError, match=message):
        custom(small, tmp_path, entry)


def test_custom_file_errors(small: TextConfig, tmp_path: Path) -> None:
    with pytest.raises(SubnetError, match=r"custom subnet file .*missing.yaml: no such file"):
        load_subnet_table(small, None, tmp_path / "missing.yaml")
    with pytest.raises(SubnetError, match=r"unknown key\(s\) \['subnet'\]"):
        load_subnet_table(small, None, write_yaml(tmp_path, {"subnet": []}))
    with pytest.raises(SubnetError, match="'subnets' must be a list"):
        load_subnet_table(small, None, write_yaml(tmp_path, {"subnets": {"name": "x"}}))
    (tmp_path / "bad.yaml").write_text("subnets: [", encoding="utf-8")
    with pytest.raises(SubnetError, match="not valid YAML"):
        load_subnet_table(small, None, tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    assert load_subnet_table(small, None, tmp_path / "empty.yaml").names() == ("full",)


# ---- format_table -----------------------------------------------------------------------------


def test_format_table(e4b: TextConfig) -> None:
    table = load_subnet_table(e4b)
    out = format_table(table)
    for s in table:
        assert s.name in out and s.kv_key in out
    assert "30 (skip 20-24)" in out and "33 (skip 3, 7)" in out
    assert "3.98 (E4B table: 3.98 B)" in out and "2.52 (E4B table: 2.54 B)" in out
    assert "62.3" in out and "effective params (B)" in out
    note = format_table(load_subnet_table(e4b, None, None))
    assert "note: official subnets not loaded" in note


def test_quality_scores_fill_in_missing_scores_from_parameter_counts():
    from server.vocabulary.subnets import quality_scores

    q = quality_scores(
        [
            ("a", 50.0, 2_000),
            ("b", 60.0, 4_000),
            ("custom", None, 3_000),
            ("big", None, 9_000),
            ("small", None, 1_000),
        ]
    )
    assert q["custom"] == pytest.approx(55.0)
    assert q["big"] == 60.0 and q["small"] == 50.0
