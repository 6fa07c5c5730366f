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
SECTIONS = (
    "smoke", "bandwidth", "decode", "compiled", "kernels", "transformers", "engine", "residency"
)  # fmt: skip
TIMED = tuple(s for s in SECTIONS if s != "bandwidth")  # each needs a budget
HEADINGS = (
    "## 0. Smoke: every risky path once",
    "## 1. Copy bandwidth",
    "## 2. Batch-1 decode vs the memory-bandwidth floor",
    "## 3. Compiled decode steps (captured CUDA graphs) against eager",
    "## 4. Kernels in one batch-1 decode step",
    "## 5. transformers generate() on the same weights",
    "## 6. Concurrent mixed-subnet requests through the engine",
    "## 7. Resident FFN widths",
)
QUICK = [
    "--scale", "small", "--device", "cpu", "--dtype", "float32", "--threads", "1",
    "--copy-mb", "16", "--copy-repeats", "3", "--prompt-tokens", "12", "--decode-tokens", "6",
    "--repeats", "1", "--hf-tokens", "6", "--engine-prompt", "8:24", "--engine-output", "2:4",
    "--hf-subnets", "full,e2b", "--compiled-rows", "2",
]  # fmt: skip


def run_script(out: Path, work: Path, *extra: str) -> tuple[list[dict], str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OUT="", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *QUICK, "--out", str(out), "--work", str(work), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / "gpu_e4b.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], (out / "gpu_e4b.md").read_text()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu-work")


def test_small_scale_measures_every_section(tmp_path: Path, work: Path) -> None:
    records, table = run_script(tmp_path / "out", work, "--time-budget-s", "200")
    by = {s: [r for r in records if r["section"] == s] for s in {r["section"] for r in records}}
    assert by["done"], "the run did not finish"
    assert by["checkpoint"][0]["reused"] is False
    assert by["load"][0]["layers"] == 35
    for section in SECTIONS:
        assert any("skipped" not in r for r in by[section]), (section, by.get(section))

    # Only the host-to-device copy and the compiled steps (gathered, paged) are skipped on a CPU,
    # saying why.
    skipped = [(r["section"], r.get("kind") or r.get("mode")) for r in records if "skipped" in r]
    assert skipped == [
        ("bandwidth", "host to device"),
        ("kernels", "compiled"),
        ("kernels", "compiled paged"),
    ]

    # The smoke ran every risky path, and each went right.
    smoke = {r["check"]: r for r in by["smoke"]}
    assert set(smoke) == {"open", "grow", "oom", "sampling", "mixed bf16", "kernels"}
    assert all(r["ok"] for r in smoke.values()), smoke
    assert smoke["oom"]["kinds"] == {"torch": 1} and smoke["grow"]["grow_failures"] == 0
    assert smoke["mixed bf16"]["invariant"] == smoke["mixed bf16"]["of"]

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
    assert len(steps) == 5 and steps[1].startswith("shrink") and steps[3].startswith("grow")
    grow = by["residency"][3]
    assert grow["decode_check"].endswith("equal to before") and grow["decode_during_build"]
    assert grow["shrink_check"].endswith("equal to before")
    # float32 on a CPU: the resident rows are views of the mapping, nothing for a grow to hold
    assert grow["predicted_peak_bytes"] == 0 and grow["peak_extra_bytes"] is None

    # The compiled step (aot_eager on a CPU) against eager on the same two requests, one greedy
    # and one sampled: every decode step timed, nothing failed, one graph, and the greedy
    # request's float32 tokens equal (the sampled one's draw may flip on a last-bit difference).
    compiled = {r["mode"]: r for r in by["compiled"]}
    assert set(compiled) == {"eager", "compiled", "compiled / eager"}
    for mode in ("eager", "compiled"):
        r = compiled[mode]
        assert r["rows"] == 2 and r["sampled"] == 1 and r["errors"] == {}, r
        assert r["steps"] == 6 - 2 and r["step_ms"] > 0  # 6 tokens: prefill, profiled, 4 timed
        assert [len(t) for t in r["tokens"]] == [6, 6]
    assert compiled["compiled"]["graphs"] == 1 and compiled["eager"]["graphs"] is None
    assert compiled["compiled"]["tokens"][0] == compiled["eager"]["tokens"][0]
    assert compiled["compiled / eager"]["requests"] == 2

    [eager] = [r for r in by["kernels"] if "skipped" not in r]
    assert eager["mode"] == "eager" and eager["operators"] > 0 and eager["step_ms"] > 0

    for heading in HEADINGS:
        assert heading in table
    assert "skipped: no accelerator" in table
    assert "Finished in" in table


def test_sections_that_do_not_fit_say_why(tmp_path: Path, work: Path) -> None:
    # A spent budget: what needs time is skipped with the reason; --skip is reported as such.
    records, table = run_script(
        tmp_path / "out", work, "--time-budget-s", "0", "--skip", "residency"
    )
    reasons = {r["section"]: r["skipped"] for r in records if "skipped" in r}
    assert set(reasons) == set(SECTIONS), records
    for section in TIMED:
        if section != "residency":
            assert reasons[section].startswith("time budget"), reasons
    assert reasons["residency"] == "--skip"
    for heading in HEADINGS:
        section = table.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "skipped: " in section or "| --- |" in section, heading
