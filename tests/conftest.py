"""Suite-wide settings, applied before any test module imports torch, and the tiny dev
checkpoint, made once per run for every layer's tests that need a model.

OpenMP threads spin while they wait by default. On a 2-core machine, as soon as anything else
holds a core (a server subprocess a test started, the CLI under test), spinning threads turn a
70 ms forward into seconds. Passive waiting costs nothing measurable when the machine is quiet.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dev checkpoint (E4B's topology, random weights), written once per session."""
    from server.tools.dev_model import make_dev_model

    return make_dev_model("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", progress=False)
