"""Measured quality: the subnet table's scores come from a checkpoint's quality file when it has
one, and only for subnets measured as they are defined now. Plain Python, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.vocabulary.measured_quality import (
    QUALITY_FILE,
    MeasuredSubnet,
    QualityFileError,
    quality_document,
    read_measured_quality,
    score_of,
)
from server.vocabulary.subnets import format_table, load_subnet_table
from server.vocabulary.text_config import text_config_from_dict
from tests.unit.test_subnets import SMALL

TEXT = text_config_from_dict(SMALL)


def write_quality(folder: Path, perplexity: dict[str, float], table=None) -> Path:
    table = table or load_subnet_table(TEXT)
    subnets = [
        MeasuredSubnet(s.name, s.layers, s.widths, perplexity[s.name], 0.1)
        for s in table
        if s.name in perplexity
    ]
    doc = quality_document("test", 1000, subnets)
    (folder / QUALITY_FILE).write_text(json.dumps(doc))
    return folder


def test_without_a_quality_file_scores_are_the_tables_mmlu(tmp_path: Path):
    assert read_measured_quality(tmp_path) is None
    table = load_subnet_table(TEXT, measured=None)
    assert table.quality_source == "table"
    assert table.scores["e2b"] == table["e2b"].quality == 50.9
    assert table.measured == {}


def test_measured_perplexity_replaces_mmlu_as_the_score(tmp_path: Path):
    table = load_subnet_table(TEXT)
    ppl = {s.name: 40.0 + i for i, s in enumerate(table)}  # every subnet measured
    measured = read_measured_quality(write_quality(tmp_path, ppl))
    scored = load_subnet_table(TEXT, measured=measured)
    assert scored.quality_source == "measured"
    for s in scored:
        assert scored.scores[s.name] == pytest.approx(100.0 / ppl[s.name])
        assert scored.measured[s.name].perplexity == ppl[s.name]
    # Lower perplexity is a higher score: what tiers' floors and the policies compare.
    assert scored.scores["full"] > scored.scores["e2b"]
    assert score_of(20.0) > score_of(40.0)
    shown = format_table(scored)
    assert "held-out ppl" in shown and f"{ppl['e2b']:.2f}" in shown


def test_a_redefined_or_unmeasured_subnet_is_interpolated_never_given_a_stale_score(
    tmp_path: Path,
):
    table = load_subnet_table(TEXT)
    ppl = {s.name: 30.0 if s.name == "full" else 60.0 for s in table}
    ppl.pop("e2.54b-layer")  # never measured
    doc = json.loads((write_quality(tmp_path, ppl) / QUALITY_FILE).read_text())
    doc["subnets"]["mix-0.75"]["widths"][0] -= 1  # measured as another definition
    (tmp_path / QUALITY_FILE).write_text(json.dumps(doc))
    scored = load_subnet_table(TEXT, measured=read_measured_quality(tmp_path))
    assert "mix-0.75" not in scored.measured and "e2.54b-layer" not in scored.measured
    # Interpolated by effective parameters between measured subnets (100/60 .. 100/30), never
    # the table's MMLU (55.4 for e2.54b-layer), which is on another scale.
    for name in ("mix-0.75", "e2.54b-layer"):
        assert 100 / 60 <= scored.scores[name] <= 100 / 30
    assert any("not measured" in n and "mix-0.75" in n for n in scored.notes)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"format": "other"}', "not a concentric-subnet-quality"),
        (
            '{"format": "concentric-subnet-quality/1", "tokens": 1, "description": "",'
            ' "subnets": {"a": {"layers": [0], "widths": [1], "perplexity": 0.5, "top1": 0}}}',
            "perplexity 0.5 is not >= 1",
        ),
        ('{"format": "concentric-subnet-quality/1", "subnets": {}}', "malformed"),
    ],
)
def test_a_bad_quality_file_is_one_clear_error(tmp_path: Path, content: str, message: str):
    (tmp_path / QUALITY_FILE).write_text(content)
    with pytest.raises(QualityFileError, match=message):
        read_measured_quality(tmp_path)
