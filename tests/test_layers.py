"""Imports run one way (docs/architecture.md): datasets -> trainables -> orchestrator -> bench/tests.

Parses every module's imports (top level and inside functions) with ``ast``; no module is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FORBIDDEN = {  # package -> top-level packages it must never import
    "datasets": {"trainables", "orchestrator", "bench", "ray"},
    "trainables": {"orchestrator", "bench"},
    "orchestrator": {"bench"},
}
RAY_TRAIN_ADAPTER = "trainables/runtime.py"  # the one training module that may touch ray
LEAF_CONFIG = "trainables/config.py"  # the config schema: stdlib (and nothing of this project)


def imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, dotted module) of every import statement in ``path``; relative imports resolved to the package."""
    out = []
    package = package or path.relative_to(ROOT).parts[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, f"{package}.{node.module or ''}" if node.level else node.module))
    return out


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _violations(package: str, banned: set[str], files: list[Path] | None = None) -> list[str]:
    return [f"{p.name}:{line} imports {mod}" if files else f"{p.relative_to(ROOT)}:{line} imports {mod}"
            for p in files or _modules(package) for line, mod in imports(p, package) if mod.split(".")[0] in banned]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    assert _violations(package, FORBIDDEN[package]) == []


def test_only_the_adapter_touches_ray_in_the_training_code():
    found = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in _modules("trainables")
             for line, mod in imports(p)
             if mod.split(".")[0] == "ray" and str(p.relative_to(ROOT)) != RAY_TRAIN_ADAPTER]
    allowed = {"trainables/generation.py"}  # generation's optional Ray tasks (ray.remote), not Ray Train
    assert [v for v in found if v.split(":")[0] not in allowed] == []
    assert not [v for v in found if ".train" in v.split(" imports ")[1]]  # ray.train: the adapter only


def test_config_schema_is_a_leaf():
    mods = [mod for _, mod in imports(ROOT / LEAF_CONFIG)]
    assert not [m for m in mods if m.split(".")[0] in {"datasets", "trainables", "orchestrator", "torch", "ray"}]


def test_the_checker_sees_wrong_way_imports(tmp_path):
    """The walk finds function-level and relative imports (so the tests above can fail)."""
    bad = tmp_path / "_layers_probe.py"
    bad.write_text("def f():\n    from orchestrator import config\n    import ray.train\n    from . import files\n")
    found = _violations("datasets", FORBIDDEN["datasets"], [bad])
    assert any("_layers_probe.py:2 imports orchestrator" in v for v in found)
    assert any("_layers_probe.py:3 imports ray.train" in v for v in found)
