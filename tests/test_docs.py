"""The map stays true: docs/architecture.md names every source module, and comments point to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("datasets", "trainables", "orchestrator", "bench")


def _modules() -> list[str]:
    """Every source module but an empty ``__init__.py``."""
    return sorted(str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
                  if p.name != "__init__.py" or p.read_text().strip())


def test_architecture_names_every_source_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert [m for m in _modules() if f"`{m}`" not in text] == []


def test_the_architecture_map_names_no_module_that_is_gone():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:datasets|trainables|orchestrator|bench)/[\w/]+\.py)`", text))
    assert sorted(named - set(_modules())) == []


def test_comments_point_to_docs_that_exist():
    """Doc paths written in the source (``docs/<name>.md``) exist; nothing points outside the repository."""
    missing, outside = [], []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            missing += [f"{path.relative_to(ROOT)}: {d}" for d in set(re.findall(r"docs/[\w.-]+\.md", text))
                        if not (ROOT / d).is_file()]
            outside += [f"{path.relative_to(ROOT)}" for _ in re.findall(r"research/\w+\.md|/work/shared", text)]
    assert missing == [] and outside == []
