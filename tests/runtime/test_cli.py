"""The `concentric` command as a user runs it: a separate process, `python -m server ...`.

Proves that each subcommand does its job end to end on real files (a dev checkpoint that loads,
the subnet table, generation whose tokens are exactly the in-process runtime's, an export that
loads) and that user mistakes end in exit status 2 with one line naming the problem, never a
traceback. Every process gets its own CONCENTRIC_CACHE under tmp, so nothing touches ~/.cache,
and the test checks that no command fell back to the built-in model.

The commands are independent, so they are all started at once (each importing torch takes
seconds) and the tests read their results.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.checkpoint.store import CheckpointStore
from server.cli import main
from server.engine.offline import GenerationRequest, greedy
from server.runtime.elastic import ElasticRuntime
from server.vocabulary.subnets import load_subnet_table
from tests.runtime.conftest import alone

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The harbor town wakes"
TIMEOUT_S = 180


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Cli:
    runs: dict[str, Run]
    made: Path  # where make-dev-model wrote
    exported: Path  # where export wrote
    missing: Path  # a checkpoint folder that does not exist
    cache: Path  # CONCENTRIC_CACHE of every command


@pytest.fixture(scope="module")
def cli(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    root = tmp_path_factory.mktemp("cli")
    made, exported = root / "made", root / "exported"
    missing, cache = root / "nowhere", root / "cache"
    ckpt = ["--checkpoint", str(tiny_dir)]
    generate = [
        "generate",
        *ckpt,
        "--subnet",
        "e2b",
        "--prompt",
        PROMPT,
        "--max-tokens",
        "8",
        "--greedy",
        "--json",
        "--ignore-eos",
    ]
    commands = {
        "make": ["make-dev-model", "--preset", "tiny", "--out", str(made), "--quiet"],
        "subnets": ["subnets", *ckpt],
        "generate": generate,
        "chat": [*generate, "--chat"],
        "unknown_subnet": ["generate", *ckpt, "--subnet", "e9b", "--prompt", PROMPT],
        "missing_checkpoint": ["subnets", "--checkpoint", str(missing)],
        "export": ["export", *ckpt, "--subnet", "e2b", "--out", str(exported), "--quiet"],
        "zero_tokens": ["generate", *ckpt, "--prompt", PROMPT, "--max-tokens", "0"],
        # No --checkpoint: the committed trained dev model, whose quality is measured.
        "subnets_default": ["subnets"],
        "measure": ["measure-quality", "--subnets", "e2b", "--dry-run"],
    }
    # One thread each: the processes already run side by side, and more threads than cores
    # make OpenMP's spinning workers wait on each other.
    env = dict(os.environ, CONCENTRIC_CACHE=str(cache), OMP_NUM_THREADS="1")
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", "server", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, args in commands.items()
    }
    runs = {}
    try:
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT_S)
            runs[key] = Run(proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Cli(runs, made, exported, missing, cache)


def succeeded(run: Run) -> Run:
    assert run.returncode == 0, run.stderr
    return run


def user_error(run: Run) -> str:
    """The one line a user mistake must produce: exit status 2, no traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("concentric: error: ")
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_make_dev_model_writes_a_loadable_checkpoint(cli: Cli, tiny_dir: Path) -> None:
    run = succeeded(cli.runs["make"])
    assert str(cli.made) in run.stdout
    store = CheckpointStore.open(cli.made)
    assert store.text.num_hidden_layers == 35
    # The same bytes as the in-process writer: the command adds nothing of its own.
    for path in sorted(tiny_dir.iterdir()):
        assert sha256(cli.made / path.name) == sha256(path), path.name


def test_subnets_prints_every_subnet_and_kv_key(cli: Cli, tiny: ElasticRuntime) -> None:
    run = succeeded(cli.runs["subnets"])
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.strip()}
    table = load_subnet_table(tiny.store.text)
    assert len(table) == 19
    for subnet in table:
        assert subnet.name in rows, subnet.name
        # The KV key is the row's last column.
        assert rows[subnet.name][-1] == subnet.kv_key, subnet.name


def generated(run: Run) -> dict:
    lines = succeeded(run).stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout
    return json.loads(lines[0])


def test_generate_json_equals_the_in_process_runtime(cli: Cli, tiny: ElasticRuntime) -> None:
    out = generated(cli.runs["generate"])
    assert out["subnet"] == "e2b"
    assert out["prompt_token_ids"] == tiny.tokenizer.encode(PROMPT)
    assert len(out["token_ids"]) == 8
    request = GenerationRequest(tiny.subnets["e2b"], out["prompt_token_ids"], greedy(8))
    result = alone(tiny, request)
    assert out["token_ids"] == result.token_ids
    assert out["text"] == tiny.tokenizer.decode(result.token_ids)


def test_chat_wraps_the_prompt_in_the_template(cli: Cli, tiny: ElasticRuntime) -> None:
    plain, chat = generated(cli.runs["generate"]), generated(cli.runs["chat"])
    ids = chat["prompt_token_ids"]
    assert ids == tiny.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    assert ids != plain["prompt_token_ids"]
    assert ids[0] == 2  # BOS, written by the template itself
    assert ids.count(2) == 1
    assert 105 in ids  # <start_of_turn>
    assert len(chat["token_ids"]) == 8


def test_unknown_subnet_is_one_line_naming_the_known_ones(cli: Cli, tiny: ElasticRuntime) -> None:
    line = user_error(cli.runs["unknown_subnet"])
    assert "'e9b'" in line
    for name in tiny.subnets.names():
        assert name in line


def test_missing_checkpoint_is_named(cli: Cli) -> None:
    line = user_error(cli.runs["missing_checkpoint"])
    assert str(cli.missing) in line
    assert "does not exist" in line


def test_export_writes_a_folder_that_loads(cli: Cli, tiny: ElasticRuntime) -> None:
    run = succeeded(cli.runs["export"])
    assert str(cli.exported) in run.stdout
    store = CheckpointStore.open(cli.exported)
    assert store.text.num_hidden_layers == len(tiny.subnets["e2b"].layers)
    assert store.text.intermediate_size == tiny.subnets["e2b"].widths


def test_zero_max_tokens_is_refused(cli: Cli) -> None:
    line = user_error(cli.runs["zero_tokens"])
    assert "--max-tokens" in line


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process through the entry point's own `main` (a process more would cost seconds of
    # imports): an existing file as --out once escaped as a NotADirectoryError traceback.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    code = main(["make-dev-model", "--preset", "tiny", "--out", str(a_file), "--quiet"])
    captured = capsys.readouterr()
    line = user_error(Run(code, captured.out, captured.err))
    assert str(a_file) in line
    assert a_file.read_text() == "not a folder"


def test_no_command_touched_the_cache(cli: Cli) -> None:
    # The commands without a checkpoint use the committed trained model; none may fall back to
    # making a random one in the cache.
    assert not cli.cache.exists() or not any(cli.cache.iterdir())


def test_without_a_checkpoint_the_trained_model_and_its_measured_quality_are_used(cli: Cli):
    from server.tools.dev_model import TRAINED_CHECKPOINT

    run = succeeded(cli.runs["subnets_default"])
    assert str(TRAINED_CHECKPOINT) in run.stderr
    header = run.stdout.splitlines()[0]
    assert "held-out ppl (score)" in header
    stored = json.loads((TRAINED_CHECKPOINT / "subnet_quality.json").read_text())
    e2b = next(line for line in run.stdout.splitlines() if line.startswith("e2b "))
    assert f"{stored['subnets']['e2b']['perplexity']:.2f}" in e2b


def test_measure_quality_reproduces_the_stored_perplexity(cli: Cli):
    from server.tools.dev_model import TRAINED_CHECKPOINT

    run = succeeded(cli.runs["measure"])
    line = next(x for x in run.stdout.splitlines() if x.startswith("e2b "))
    got = float(line.split()[2])
    stored = json.loads((TRAINED_CHECKPOINT / "subnet_quality.json").read_text())
    want = stored["subnets"]["e2b"]["perplexity"]
    # Same float32 computation over the same 26k tokens: another CPU or thread count moves the
    # mean log-likelihood by float32 rounding (~1e-6 relative); 1e-4 also covers the printed 3
    # decimals. --dry-run wrote nothing.
    assert abs(got - want) <= 1e-4 * want + 5e-4
    assert json.loads((TRAINED_CHECKPOINT / "subnet_quality.json").read_text()) == stored
