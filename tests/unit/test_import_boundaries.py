"""The layering, read from the imports of every module: one test for every boundary.

Two rules, checked on the module-level imports (an import inside a function runs only when that
function is called, so it does not tie the modules together at import time):

1. Layers import one way: api -> engine -> runtime -> checkpoint -> vocabulary; policies and
   vocabulary import nothing above them; tools (offline) are imported by no serving layer.
2. Only the torch side imports torch (or transformers, which imports it): everything outside the
   torch packages below is plain Python, so the scheduler, the engine, the policies, the
   vocabulary and the API's plain modules load and test without it. Checked on the transitive
   closure of imports, and once in a fresh interpreter for the engine (ground truth).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "safetensors", "numpy")  # torch itself or what pulls it in

# Modules that may import torch (directly or through others): the compute side, checkpoint I/O
# (tensors are views of the mapping), offline tools, and what wires an engine to a runtime.
TORCH_SIDE = (
    "server.runtime",
    "server.checkpoint",
    "server.tools",
    "server.engine.assembly",
    "server.api.service",  # loads the runtime and assembles the engine
    "server.api.submission",
    "server.api.responses",
    "server.api.openai_routes",
    "server.api.tokenization",  # the routes' prompt checks (openai_routes)
    "server.api.app",
    "server.api.serve",
    "server.cli",
    "server.__main__",
    # The fleet's Ray Serve deployments run whole services (an engine; the API).
    "server.fleet.engine_replica",
    "server.fleet.ingress",
    "server.fleet.application",
)

# package -> packages it must never import (module level)
FORBIDDEN = {
    "policies": ("server",),
    "server.vocabulary": (
        "server.api",
        "server.engine",
        "server.runtime",
        "server.checkpoint",
        "server.tools",
        "server.telemetry",
        "server.tenancy",
        "server.config",
    ),
    "server.checkpoint": ("server.api", "server.engine", "server.runtime", "server.tools"),
    "server.runtime": ("server.api", "server.engine", "server.tools"),
    "server.engine": ("server.api", "server.tools"),
    "server.telemetry": ("server.api", "server.engine", "server.runtime", "server.tools"),
}


def modules() -> dict[str, Path]:
    found = {}
    for root in ("server", "policies"):
        for path in sorted((REPO / root).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def top_level_imports(path: Path) -> set[str]:
    """Modules named by imports at module level (not inside functions or classes)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


MODULES = modules()
IMPORTS = {name: top_level_imports(path) for name, path in MODULES.items()}


def closure(name: str) -> set[str]:
    """Everything importing `name` imports, transitively (our modules followed, others kept)."""
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        for imp in IMPORTS.get(mod, ()):
            if imp in seen:
                continue
            seen.add(imp)
            if imp in MODULES:
                todo.append(imp)
    return seen


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_every_module_was_found() -> None:
    # A sanity floor: the walk saw the packages this test reasons about.
    for package in ("server.engine.scheduler", "server.runtime.gemma3n", "policies.snapshots"):
        assert package in MODULES


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_one_way(package: str) -> None:
    bad = sorted(
        f"{mod} imports {imp}"
        for mod in MODULES
        if within(mod, package)
        for imp in IMPORTS[mod]
        for above in FORBIDDEN[package]
        if within(imp, above)
    )
    assert not bad, bad


def test_serving_code_never_imports_offline_tools() -> None:
    serving = ("server.api", "server.engine", "server.runtime", "server.telemetry")
    bad = sorted(
        f"{mod} imports {imp}"
        for mod in MODULES
        if any(within(mod, p) for p in serving)
        for imp in IMPORTS[mod]
        if within(imp, "server.tools")
    )
    assert not bad, bad


def test_only_the_torch_side_imports_torch() -> None:
    plain = [m for m in MODULES if not any(within(m, t) for t in TORCH_SIDE)]
    assert len(plain) > 20, plain  # the scheduler, engine, policies, vocabulary, api's plain part
    bad = {}
    for mod in plain:
        heavy = sorted(i for i in closure(mod) if any(within(i, h) for h in HEAVY))
        if heavy:
            bad[mod] = heavy
    assert not bad, bad


def test_the_engine_and_the_policies_load_without_torch() -> None:
    # Ground truth for the static check: a fresh interpreter, whatever this process imported.
    code = (
        "import sys, server.engine.engine, server.engine.async_engine, server.engine.offline, "
        "policies.subnet_choice, server.config, server.tenancy, server.api.limits\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
