import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from datasets import synthetic
from datasets.market1501 import load, parse_name
from datasets.synthetic import COUNTS, MARKER, MARKET1501, Counts, contact_sheet, generate, plan

# Market-1501 at 1/25: small enough to draw in a second, same shape (junk added to check that count too)
SCALED = Counts(train_ids=30, train_images=517, test_ids=30, query=135, gallery_ids_images=525, distractors=112,
                junk=7)


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


def _check_counts(shots: list[tuple[str, int, int]], c: Counts) -> None:
    """``shots``: (split, pid, camid) of every image; asserts ``c``'s exact numbers and the query protocol."""
    train = [(pid, cam) for split, pid, cam in shots if split == "train"]
    query = [(pid, cam) for split, pid, cam in shots if split == "query"]
    gallery = [(pid, cam) for split, pid, cam in shots if split == "gallery"]
    assert len({pid for pid, _ in train}) == c.train_ids and len(train) == c.train_images
    assert len({pid for pid, _ in query}) == c.test_ids and len(query) == c.query
    assert len(gallery) == c.gallery == c.gallery_ids_images + c.distractors + c.junk
    assert sum(pid == 0 for pid, _ in gallery) == c.distractors
    assert sum(pid == -1 for pid, _ in gallery) == c.junk
    assert {pid for pid, _ in gallery if pid > 0} == {pid for pid, _ in query}
    assert not {pid for pid, _ in train} & {pid for pid, _ in query}
    assert len(query) == len(set(query))  # at most one query per (identity, camera)
    cams: dict[int, set[int]] = {}
    for pid, cam in gallery:
        cams.setdefault(pid, set()).add(cam)
    assert all(cams[pid] - {cam} for pid, cam in query)  # a same-id gallery image in another camera


def test_counted_dataset_has_exact_counts(tmp_path):
    split = generate(tmp_path / "c", counts=SCALED, size=(32, 16), seed=5, workers=1, ids=3, junk=999)
    shots = [(name, r.pid, r.camid) for name, recs in (("train", split.train), ("query", split.query),
                                                        ("gallery", split.gallery)) for r in recs]
    _check_counts(shots, SCALED)
    assert split == load(tmp_path / "c")
    per_id = [sum(r.pid == pid for r in split.train) for pid in {r.pid for r in split.train}]
    assert min(per_id) >= 1 and max(per_id) > min(per_id)  # a spread, not the same number for everyone
    with Image.open(split.query[0].path) as im:
        assert im.size == (16, 32)


def test_market1501_plan_is_exact_and_deterministic():
    assert COUNTS["market1501"] is MARKET1501
    assert (MARKET1501.train_ids, MARKET1501.train_images, MARKET1501.test_ids, MARKET1501.query) == \
        (751, 12_936, 750, 3_368)
    assert (MARKET1501.gallery, MARKET1501.gallery_ids_images, MARKET1501.distractors, MARKET1501.junk) == \
        (15_913, 13_120, 2_793, 0)
    persons, cameras, jobs = plan(seed=0, counts="market1501", ids=5, distractors=1, junk=9)
    _check_counts([(j.split, *parse_name(j.name)) for j in jobs], MARKET1501)
    assert len({j.name for j in jobs}) == len(jobs) and len(persons) == 751 + 750 + 2_793
    assert plan(seed=0, counts=MARKET1501)[2] == jobs  # the name and the object are the same layout
    assert plan(seed=1, counts="market1501")[2] != jobs


def test_counts_errors_name_the_field():
    with pytest.raises(ValueError, match="market1501"):
        plan(counts="market")
    with pytest.raises(ValueError, match="market1501"):
        generate("/nonexistent/never-written", counts="duke")
    with pytest.raises(ValueError, match="Counts.query"):
        Counts(train_ids=4, train_images=8, test_ids=3, query=19, gallery_ids_images=6, distractors=0, junk=0)
    with pytest.raises(ValueError, match="Counts.gallery_ids_images"):
        Counts(train_ids=4, train_images=8, test_ids=3, query=3, gallery_ids_images=5, distractors=0, junk=0)
    with pytest.raises(ValueError, match="Counts.train_images"):
        Counts(train_ids=4, train_images=3, test_ids=3, query=3, gallery_ids_images=6, distractors=0, junk=0)


def test_counted_and_poisson_sets_never_share_a_folder(tmp_path):
    small = Counts(train_ids=3, train_images=7, test_ids=3, query=5, gallery_ids_images=8, distractors=2, junk=1)
    generate(tmp_path / "c", counts=small, size=(32, 16), workers=1)
    stamp = (tmp_path / "c" / MARKER).stat().st_mtime_ns
    generate(tmp_path / "c", counts=Counts(**vars(small)), size=(32, 16), workers=1, ids=9)  # ignored args: reused
    assert (tmp_path / "c" / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="same arguments"):
        generate(tmp_path / "c", size=(32, 16), workers=1)
    generate(tmp_path / "p", ids=3, images_per_id=3, distractors=2, junk=1, size=(32, 16), workers=1)
    with pytest.raises(FileExistsError, match="same arguments"):
        generate(tmp_path / "p", ids=3, images_per_id=3, distractors=2, junk=1, size=(32, 16), workers=1,
                 counts=small)


def test_cli_counts_and_size(monkeypatch, tmp_path, tiny_split):
    calls = []
    monkeypatch.setattr(synthetic, "generate", lambda out, **kw: calls.append(kw) or tiny_split)
    assert synthetic.main(["--out", str(tmp_path / "m"), "--counts", "market1501", "--size", "32", "16"]) == 0
    assert calls[0]["counts"] == "market1501" and calls[0]["size"] == (32, 16)
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "m"), "--counts", "nope"])


@pytest.mark.parametrize("query", [10, 60])  # one query per test id, and one in every camera
def test_counted_plan_at_the_limits(query):
    tight = Counts(train_ids=12, train_images=12, test_ids=10, query=query, gallery_ids_images=20, distractors=0,
                   junk=0)
    _, _, jobs = plan(seed=2, counts=tight)
    _check_counts([(j.split, *parse_name(j.name)) for j in jobs], tight)
