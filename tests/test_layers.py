"""The house rules of docs/architecture.md, checked on the source: imports run one way (datasets -> trainables ->
orchestrator -> bench/tests), the GAN and re-ID code never import each other, the schema is a leaf, the driver
imports no torch, label-method names live in a few modules, no module is over 400 lines.

Parses every module's imports (top level and inside functions) with ``ast``; no module is imported (but the
one test that starts a fresh interpreter to see what the driver imports).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.config import GAN_ARCHS
from trainables.methods import LABEL_METHODS

ROOT = Path(__file__).parents[1]
SOURCE_PACKAGES = ("datasets", "trainables", "orchestrator", "bench")
FORBIDDEN = {  # package -> top-level packages (or subpackages) it must never import
    "datasets": {"trainables", "orchestrator", "bench", "ray"},
    "trainables": {"orchestrator", "bench"},
    "orchestrator": {"bench"},
    "trainables/gan": {"trainables.reid", "trainables.evaluation"},
    "trainables/reid": {"trainables.gan"},
    "trainables/evaluation": {"trainables.gan", "trainables.reid"},
}
RAY_TRAIN_ADAPTER = "trainables/runtime.py"  # the one training module that may touch ray.train
RAY_CORE = {"trainables/gan/sample.py",  # generation's optional helper actors (ray.remote)
            "trainables/placement.py"}  # the node a process runs on, for messages
# stdlib + each other
LEAVES = ("trainables/config.py", "trainables/schema.py", "trainables/methods.py", "trainables/placement.py")
# the modules where label-method names may be written (the traits table, the presets, the published numbers, the
# stage names); everywhere else a method is a trait of trainables.methods
# (orchestrator/stages.py and pool_stages.py: "baseline" is also the name of a stage, a key of the stage hashes)
METHOD_NAMES_IN = {"trainables/methods.py", "orchestrator/config.py", "orchestrator/paper_numbers.py",
                   "orchestrator/stages.py", "orchestrator/pool_stages.py"}
MAX_LINES = 400
# gan.arch=lsro names the generator of LSRO's repository (layumi/Person-reID_GAN@6621e2c), not the label method
GAN_ARCH_NAMES_IN = {"trainables/config.py", "trainables/gan/nets.py"}


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


def source_modules() -> list[Path]:
    return [p for package in SOURCE_PACKAGES for p in _modules(package)]


def _banned(mod: str, banned: set[str]) -> bool:
    return any(mod == b or mod.startswith(b + ".") for b in banned)


def _violations(package: str, banned: set[str], files: list[Path] | None = None) -> list[str]:
    top = package.split("/")[0]
    return [f"{p.name}:{line} imports {mod}" if files else f"{p.relative_to(ROOT)}:{line} imports {mod}"
            for p in files or _modules(package) for line, mod in imports(p, top) if _banned(mod, banned)]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    assert _violations(package, FORBIDDEN[package]) == []


def test_only_the_adapter_touches_ray_in_the_training_code():
    found = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in _modules("trainables")
             for line, mod in imports(p)
             if mod.split(".")[0] == "ray" and str(p.relative_to(ROOT)) != RAY_TRAIN_ADAPTER]
    assert [v for v in found if v.split(":")[0] not in RAY_CORE] == []
    assert not [v for v in found if ".train" in v.split(" imports ")[1]]  # ray.train: the adapter only


@pytest.mark.parametrize("leaf", LEAVES)
def test_the_leaves_import_only_the_stdlib_and_each_other(leaf):
    """The schema, the method traits and the placement labels: what the driver reads without torch."""
    leaf_modules = {p.removesuffix(".py").replace("/", ".") for p in LEAVES}
    mods = [mod for _, mod in imports(ROOT / leaf)]
    project = {"datasets", "trainables", "orchestrator", "bench"}
    assert not [m for m in mods if m.split(".")[0] in {"torch", "numpy"} or
                (m.split(".")[0] in project and m not in leaf_modules)]


def test_the_driver_imports_no_torch():
    """The CLIs plan, schedule and track; torch loads in the Ray workers (stage builders and trials import the
    training code inside the functions that run there). A fresh interpreter imports every driver module."""
    mods = ["orchestrator.sweep", "orchestrator.report", "orchestrator.train", "orchestrator.trial_actor"]
    code = (f"import sys; import {', '.join(mods)}; "
            f"print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every str constant that is not a docstring."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef,
                  ast.ClassDef, ast.AsyncFunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_label_method_names_are_written_in_few_modules():
    """A method's properties are traits (trainables/methods.py), not comparisons of its name spread over modules."""
    found = sorted({str(p.relative_to(ROOT)) for p in source_modules()
                    for _, value in _string_constants(p) if value in LABEL_METHODS
                    and not (value in GAN_ARCHS and str(p.relative_to(ROOT)) in GAN_ARCH_NAMES_IN)})
    assert set(found) <= METHOD_NAMES_IN, sorted(set(found) - METHOD_NAMES_IN)


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in source_modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checkers_see_wrong_way_imports_and_names(tmp_path):
    """The walk finds function-level and relative imports, subpackage rules and method names (so the tests above
    can fail)."""
    bad = tmp_path / "_layers_probe.py"
    bad.write_text('"""lsro in a docstring is fine."""\ndef f():\n    from orchestrator import config\n'
                   '    import ray.train\n    from . import files\n    return "lsro"\n')
    found = _violations("datasets", FORBIDDEN["datasets"], [bad])
    assert any("_layers_probe.py:3 imports orchestrator" in v for v in found)
    assert any("_layers_probe.py:4 imports ray.train" in v for v in found)
    gan = tmp_path / "_gan_probe.py"
    gan.write_text("from trainables.reid.models import IdentificationNet\nfrom trainables.reidx import y\n")
    assert _violations("trainables/gan", FORBIDDEN["trainables/gan"], [gan]) == [
        "_gan_probe.py:1 imports trainables.reid.models"]
    assert _string_constants(bad) == [(6, "lsro")]
