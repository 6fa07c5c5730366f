"""benchmarks/gpu_e4b.py gets one try on a lent accelerator, so it must already work end to end:
here it runs at the `small` scale on the CPU, in a subprocess exactly as it is run there, and
its two output files must hold every section, measured or explicitly skipped with a reason.

Small token counts keep it to seconds; one thread, because timings are not what is checked and
two threads on a busy two-core machine can slow torch tenfold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_e4b.py"
SECTIONS = ("bandwidth", "decode", "engine", "transformers", "residency")
HEADINGS = (
    "## 1. Copy bandwidth",
    "## 2. Batch-1 decode vs the memory-bandwidth floor",
    "## 3. Concurrent mixed-subnet requests through the engine",
    "## 4. transformers generate() on the same weights",
    "## 5. Resident FFN widths",
)
QUICK = [
    "--scale", "small", "--device", "cpu", "--dtype", "float32", "--threads", "1",
    "--copy-mb", "16", "--copy-repeats", "3", "--prompt-tokens", "12", "--decode-tokens", "6",
    "--repeats", "1", "--hf-tokens", "6", "--engine-prompt", "8:24", "--engine-output", "2:4",
]  # fmt: skip


def run_script(out: Path, work: Path, *extra: str) -> tuple[list[dict], str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OUT="", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *QUICK, "--out", str(out), "--work", str(work), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / "gpu_e4b.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], (out / "gpu_e4b.md").read_text()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu-work")


def test_small_scale_measures_every_section(tmp_path: Path, work: Path) -> None:
    records, table = run_script(tmp_path / "out", work, "--time-budget-s", "120")
    by = {s: [r for r in records if r["section"] == s] for s in {r["section"] for r in records}}
    assert by["done"], "the run did not finish"
    assert by["checkpoint"][0]["reused"] is False
    assert by["load"][0]["layers"] == 35
    for section in SECTIONS:
        assert any("skipped" not in r for r in by[section]), (section, by.get(section))

    # Only the host-to-device copy is skipped on a CPU, and it says why.
    skipped = [r for r in records if "skipped" in r]
    assert [(r["section"], r["kind"]) for r in skipped] == [("bandwidth", "host to device")]

    decode = {r["subnet"]: r for r in by["decode"]}
    assert set(decode) == {"full", "e2b"}
    for r in decode.values():
        assert r["tps"] > 0 and r["floor_tps"] > 0
        assert (
            r["bytes_per_token"] == (r["effective_params"] + 768 * 64) * 4
        )  # tiny: vocab x hidden
        assert len(r["tokens"]) == 6
    assert decode["e2b"]["bytes_per_token"] < decode["full"]["bytes_per_token"]

    assert [r["requests"] for r in by["engine"]] == [16, 64]
    for r in by["engine"]:
        assert 2 * r["requests"] <= r["tokens"] <= 4 * r["requests"]  # every output length 2..4

    # transformers on the same weights: float32 greedy tokens match ours exactly.
    hf = {r["subnet"]: r for r in by["transformers"]}
    assert set(hf) == {"full", "e2b"}
    assert hf["e2b"]["export_s"] is not None and hf["full"]["export_s"] is None
    for name, r in hf.items():
        assert r["tokens"] == decode[name]["tokens"], name
        assert r["greedy_agree"] == r["greedy_compared"] == 6

    steps = [r["step"] for r in by["residency"]]
    assert len(steps) == 4 and steps[1].startswith("shrink") and steps[3].startswith("grow")
    assert all(
        r["decode_check"].endswith("equal to before") for r in by["residency"] if r["decode_check"]
    )

    for heading in HEADINGS:
        assert heading in table
    assert "skipped: no accelerator" in table
    assert "Finished in" in table


def test_sections_that_do_not_fit_say_why(tmp_path: Path, work: Path) -> None:
    # A spent budget: what needs time is skipped with the reason; --skip is reported as such.
    records, table = run_script(
        tmp_path / "out", work, "--time-budget-s", "0", "--skip", "residency"
    )
    reasons = {
        r["section"]: r["skipped"]
        for r in records
        if "skipped" in r and r["section"] in SECTIONS[1:]
    }
    assert set(reasons) == set(SECTIONS[1:]), records
    for section in ("decode", "engine", "transformers"):
        assert reasons[section].startswith("time budget"), reasons
    assert reasons["residency"] == "--skip"
    for heading in HEADINGS:
        section = table.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "skipped: " in section or "| --- |" in section, heading
