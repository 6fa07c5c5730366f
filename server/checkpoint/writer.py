"""Writing a checkpoint folder: shards and their index, made whole or not at all.

Owns what every writer of a checkpoint shares (the dev models of server/tools/dev_model.py and
the one-subnet exports of server/tools/export.py): refusing a target that holds anything,
writing into `<out>.partial` and renaming it into place only once complete (an interrupted write
never leaves a folder that looks like a checkpoint), and streaming groups of planned tensors into
`model-0000i-of-0000n.safetensors` files with the index that names them.

Deliberately does not know: which tensors a checkpoint holds, or its config files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from server.checkpoint.shard import PlannedTensor, write_shard
from server.checkpoint.store import INDEX_FILE


@contextmanager
def new_checkpoint_folder(out: str | Path) -> Iterator[Path]:
    """Yield a scratch folder to write into; on success it becomes `out` (absent or empty)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def write_shards(
    folder: Path, groups: Sequence[Sequence[PlannedTensor]], desc: str, progress: bool = True
) -> None:
    """One shard file per group, in order, and the index naming each tensor's shard."""
    total = sum(t.nbytes for group in groups for t in group)
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for i, group in enumerate(groups, start=1):
            file_name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            write_shard(folder / file_name, group, on_bytes=bar.update)
            weight_map.update({t.name: file_name for t in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / INDEX_FILE, index)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
