from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.check import bad_images, check_images
from datasets.decoded_cache import DecodedDataset, FileRows, as_batch
from datasets.market1501 import load, parse_name
from datasets.records import Record, relabel


def _touch_jpg(path: Path, colour=(120, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 32), colour).save(path)


def _tree(root: Path, names: dict[str, list[str]]) -> Path:
    for folder, files in names.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n in files:
            if n.endswith(".jpg"):
                _touch_jpg(root / folder / n)
            else:  # non-image files are ignored by the parser
                (root / folder / n).write_text("x")
    return root


HAND = {
    "bounding_box_train": ["0007_c2s1_000101_01.jpg", "0002_c1s1_000451_03.jpg", "0002_c3s2_000100_01.jpg",
                           "0010_c6s4_002202_02.jpg", "Thumbs.db"],
    "query": ["0003_c1s1_000001_01.jpg", "0004_c2s1_000002_01.jpg"],
    "bounding_box_test": ["0003_c2s1_000010_01.jpg", "0003_c1s1_000011_01.jpg", "0004_c5s1_000012_01.jpg",
                          "0000_c1s1_000013_01.jpg", "-1_c3s1_000014_01.jpg"],
}


def test_parse_name_market_and_duke():
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_name("0005_c2_f0046985.jpg") == (5, 1)
    assert parse_name("-1_c6s3_000001_00.jpg") == (-1, 5)
    assert parse_name("0000_c3s1_000013_01.jpg") == (0, 2)
    for bad in ("abc_c1s1.jpg", "0002-c1.jpg", "0002_1s1_000451_03.jpg", "0002_c0s1_000001_01.jpg"):
        with pytest.raises(ValueError, match="Market format|start at 1"):
            parse_name(bad)


def test_load_hand_made_tree(tmp_path):
    split = load(_tree(tmp_path / "m", HAND))
    assert [Path(r.path).name for r in split.train] == sorted(HAND["bounding_box_train"][:4])
    assert [(r.pid, r.camid, r.label) for r in split.train] == [(2, 0, 0), (2, 2, 0), (7, 1, 1), (10, 5, 2)]
    assert split.num_train_ids == 3
    assert Counter(r.pid for r in split.gallery) == {3: 2, 4: 1, 0: 1, -1: 1}
    assert {(r.pid, r.camid) for r in split.query} == {(3, 0), (4, 1)}
    assert all(r.label == -1 for r in (*split.query, *split.gallery))
    assert load(tmp_path / "m") == split  # deterministic


def test_duke_names_load(tmp_path):
    names = {"bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c3_f0046999.jpg"],
             "query": ["0011_c1_f0000001.jpg"], "bounding_box_test": ["0011_c4_f0000301.jpg"]}
    split = load(_tree(tmp_path / "duke", names))
    assert [(r.pid, r.camid) for r in split.train] == [(5, 1), (5, 2)]


@pytest.mark.parametrize("case, match", [
    ("no_root", "dataset root not found"),
    ("no_query", "split folder not found: .*query"),
    ("bad_name", "IMG_0001.jpg"),
    ("empty_train", "holds no images"),
    ("junk_in_train", "pid -1 is not allowed in bounding_box_train"),
    ("query_not_in_gallery", "no gallery image from another camera"),
])
def test_bad_trees_raise_naming_the_problem(tmp_path, case, match):
    names = {k: list(v) for k, v in HAND.items()}
    if case == "no_query":
        del names["query"]
    elif case == "bad_name":
        names["query"].append("IMG_0001.jpg")
    elif case == "empty_train":
        names["bounding_box_train"] = []
    elif case == "junk_in_train":
        names["bounding_box_train"].append("-1_c1s1_000001_01.jpg")
    elif case == "query_not_in_gallery":
        names["query"].append("0099_c1s1_000001_01.jpg")
    root = tmp_path / "missing" if case == "no_root" else _tree(tmp_path / case, names)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load(root)


def test_corrupt_images_are_all_listed(tmp_path):
    root = _tree(tmp_path / "m", HAND)
    good = sorted((root / "bounding_box_train").glob("*.jpg"))
    full = good[0].read_bytes()
    good[0].write_bytes(full[: len(full) // 3])  # truncated JPEG
    good[1].write_bytes(b"not an image at all")
    split = load(root)  # names still parse
    bad = bad_images(split.train)
    assert [Path(p).name for p, _ in bad] == [good[0].name, good[1].name]
    with pytest.raises(ValueError, match="2 unreadable images") as err:
        check_images(split.train)
    assert good[0].name in str(err.value) and good[1].name in str(err.value)


def test_check_command_exit_codes(tmp_path, capsys):
    from datasets.check import main

    root = _tree(tmp_path / "m", HAND)
    assert main([str(root)]) == 0
    (root / "query" / "0003_c1s1_000001_01.jpg").write_bytes(b"\xff\xd8garbage")
    assert main([str(root)]) == 1
    assert "BAD" in capsys.readouterr().out


def test_relabel_is_sorted_and_skips_generated():
    recs = [Record("b", 9, 0), Record("a", 4, 1), Record("g", -1, -1, generated=True, gen_row=0), Record("c", 9, 2)]
    out, mapping = relabel(recs)
    assert mapping == {4: 0, 9: 1}
    assert [r.label for r in out] == [1, 0, -1, 1]


def test_rows_decoded_from_files_batch_with_their_records(tiny_split):
    """``FileRows``: every read decodes the files (the same pixels each time); ``DecodedDataset`` batches them with
    the records' labels, as a DataLoader with a batch sampler hands them to the device pipeline."""
    recs = tiny_split.train[:4]
    ds = DecodedDataset(recs, FileRows(recs, (64, 32)))
    item = ds[1]
    assert item["img"].shape == (1, 64, 32, 3) and item["img"].dtype == torch.uint8
    assert item["label"].tolist() == [recs[1].label] and item["generated"].tolist() == [False]
    assert torch.equal(ds[1]["img"], item["img"])  # no randomness in the rows
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[0, 1, 2, 3]], collate_fn=as_batch)
    batch = next(iter(loader))
    assert batch["img"].shape == (4, 64, 32, 3) and batch["label"].dtype == torch.int64


def test_rows_name_an_unreadable_file(tmp_path):
    p = tmp_path / "0001_c1s1_000001_01.jpg"
    p.write_bytes(b"broken")
    with pytest.raises(OSError, match="0001_c1s1_000001_01.jpg"):
        FileRows([Record(str(p), 1, 0, label=0)], (32, 16)).take([0])


def test_hold_out_builds_a_validation_split_like_the_test_protocol(tiny_split):
    from datasets.records import hold_out

    train, val = hold_out(tiny_split, 2, np.random.default_rng(0))
    held = {r.pid for r in val.query}
    assert len(held) == 2 and not held & {r.pid for r in train.train}
    assert train.num_train_ids == tiny_split.num_train_ids - 2
    assert sorted({r.label for r in train.train}) == list(range(train.num_train_ids))  # relabelled 0..K'-1
    assert train.query == tiny_split.query and train.gallery == tiny_split.gallery  # the test split is untouched
    for q in val.query:  # every query has a match in another camera, and one query per (id, camera)
        assert any(g.pid == q.pid and g.camid != q.camid for g in (*val.gallery, *val.query) if g is not q)
    assert len({(q.pid, q.camid) for q in val.query}) == len(val.query)
    assert hold_out(tiny_split, 2, np.random.default_rng(0)) == (train, val)  # the generator alone decides
    with pytest.raises(ValueError, match="reid.val_ids=99"):
        hold_out(tiny_split, 99, np.random.default_rng(0))
