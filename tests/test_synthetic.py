import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from datasets.market1501 import load
from datasets.synthetic import MARKER, contact_sheet, generate, plan


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_protocol(tiny_root, tiny_split, tiny_params):
    TINY = tiny_params
    for d in ("bounding_box_train", "bounding_box_test", "query"):
        assert (tiny_root / d).is_dir()
    train_ids = {r.pid for r in tiny_split.train}
    test_ids = {r.pid for r in tiny_split.query}
    assert len(train_ids) == TINY["ids"] and len(test_ids) == TINY["ids"]
    assert not train_ids & test_ids  # disjoint identities
    assert sum(r.pid == 0 for r in tiny_split.gallery) == TINY["distractors"]
    assert sum(r.pid == -1 for r in tiny_split.gallery) == TINY["junk"]
    # one query per (test id, camera) and a cross-camera gallery match for each
    pairs = [(r.pid, r.camid) for r in tiny_split.query]
    assert len(pairs) == len(set(pairs))
    for pid, cam in pairs:
        assert any(g.pid == pid and g.camid != cam for g in tiny_split.gallery)
    assert {r.camid for r in tiny_split.train} <= set(range(6))
    assert sorted(r.label for r in tiny_split.train)[-1] == TINY["ids"] - 1
    with Image.open(tiny_split.train[0].path) as im:
        assert im.size == (TINY["size"][1], TINY["size"][0])


def test_deterministic_for_a_seed_and_workers(tmp_path, tiny_root, tiny_params):
    TINY = tiny_params
    a = generate(tmp_path / "a", workers=2, **TINY)
    assert _digest(tmp_path / "a") == _digest(tiny_root)  # 2 processes == 1 process
    assert a == load(tmp_path / "a")
    other = dict(TINY, seed=TINY["seed"] + 1)
    generate(tmp_path / "b", workers=1, **other)
    assert _digest(tmp_path / "b") != _digest(tiny_root)


def test_existing_folder_is_reused_or_refused(tmp_path, tiny_params):
    TINY = tiny_params
    small = dict(TINY, ids=3, images_per_id=3, distractors=1, junk=1)
    generate(tmp_path / "d", workers=1, **small)
    stamp = (tmp_path / "d" / MARKER).stat().st_mtime_ns
    generate(tmp_path / "d", workers=1, **small)  # same arguments: reused, not rewritten
    assert (tmp_path / "d" / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="same arguments"):
        generate(tmp_path / "d", workers=1, **dict(small, seed=9))
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError):
        generate(tmp_path / "e", workers=1, **small)


def test_plan_scales_to_market_size_quickly():
    persons, cameras, jobs = plan(751, 17, 2793, 3819, seed=0, test_ids=750)
    n_train = sum(j.split == "train" for j in jobs)
    n_gallery = sum(j.split == "gallery" for j in jobs)
    assert 10_000 < n_train < 16_000 and 15_000 < n_gallery < 24_000
    assert len({j.name for j in jobs}) == len(jobs)


def test_look_alikes_exist():
    persons, _, _ = plan(100, 4, 0, 0, seed=1)
    ids = persons[:200]
    near = sum(1 for i, p in enumerate(ids) for q in ids[:i]
               if sum(getattr(p, f) == getattr(q, f) for f in ("top", "top_pattern", "bottom", "hair", "bag")) >= 4)
    assert near >= 20


def test_cli_then_load(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out", str(out), "--ids", "20",
                           "--contact-sheet", str(tmp_path / "sheet.png")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    split = load(out)
    meta = json.loads((out / MARKER).read_text())
    assert len(split.train) + len(split.query) + len(split.gallery) == meta["images"]
    assert split.num_train_ids == 20 and len({r.pid for r in split.query}) == 20
    assert f"train {len(split.train)} images / 20 ids" in proc.stdout
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out", str(out), "--ids", "21"],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert bad.returncode == 2 and "same arguments" in bad.stderr


def test_contact_sheet(tiny_root, tmp_path):
    path = contact_sheet(tiny_root, tmp_path / "s.png", ids=3, per_id=4)
    with Image.open(path) as im:
        assert im.size == (4 * (32 + 4), 3 * (64 + 4))
