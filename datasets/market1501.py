"""Parser for Market-format re-ID folders: Market-1501, DukeMTMC-reID, CUHK03-np, and our synthetic set.

Layout: ``root/bounding_box_train``, ``root/bounding_box_test`` (gallery) and ``root/query``.
File names start with the pid and the camera: ``0002_c1s1_000451_03.jpg`` (Market), ``0005_c2_f0046985.jpg``
(Duke), ``-1_c1s1_000401_03.jpg`` (junk). Records keep the pid as in the file name (-1 junk, 0 distractor) and
a 0-based camera id; training records are relabelled to 0..K-1.
"""

from __future__ import annotations

import re
from pathlib import Path

from datasets.records import DISTRACTOR_PID, JUNK_PID, Record, Split, relabel

SPLIT_DIRS = {"train": "bounding_box_train", "gallery": "bounding_box_test", "query": "query"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_NAME = re.compile(r"^(-1|\d+)_c(\d+)(?:s\d+)?_.*$")


def parse_name(name: str) -> tuple[int, int]:
    """``"0002_c1s1_000451_03.jpg"`` -> ``(2, 0)``: pid as written, camera 0-based. ValueError if not Market-format."""
    m = _NAME.match(Path(name).stem)
    if m is None:
        raise ValueError(f"file name {name!r} does not follow the Market format '<pid>_c<camera>...' "
                         f"(e.g. 0002_c1s1_000451_03.jpg or 0005_c2_f0046985.jpg)")
    pid, cam = int(m.group(1)), int(m.group(2))
    if cam < 1:
        raise ValueError(f"file name {name!r}: camera numbers start at 1")
    return pid, cam - 1


def parse_dir(folder: Path, *, allow_junk: bool) -> tuple[Record, ...]:
    """Every image in ``folder`` as a record, sorted by path. Raises on a name that does not parse."""
    if not folder.is_dir():
        raise FileNotFoundError(f"split folder not found: {folder}")
    records = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        pid, camid = parse_name(path.name)
        if pid < JUNK_PID or (not allow_junk and pid in (JUNK_PID, DISTRACTOR_PID)):
            raise ValueError(f"{path}: pid {pid} is not allowed in {folder.name} "
                             f"(junk -1 and distractor 0 belong in the gallery only)")
        records.append(Record(path=str(path), pid=pid, camid=camid))
    if not records:
        raise ValueError(f"split folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return tuple(records)


def load(root: str | Path) -> Split:
    """Parse a Market-format dataset. Training pids are relabelled (``Record.label``) to 0..K-1."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    train = parse_dir(root / SPLIT_DIRS["train"], allow_junk=False)
    query = parse_dir(root / SPLIT_DIRS["query"], allow_junk=False)
    gallery = parse_dir(root / SPLIT_DIRS["gallery"], allow_junk=True)
    train, _ = relabel(train)
    _check_protocol(root, query, gallery)
    return Split(train=train, query=query, gallery=gallery, root=str(root))


def load_test(root: str | Path) -> Split:
    """A Market-format folder as a pure test set (a cross-domain one: none of its identities is trained on): its
    query and gallery, checked as :func:`load` checks them; ``bounding_box_train`` is not needed and not read."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    query = parse_dir(root / SPLIT_DIRS["query"], allow_junk=False)
    gallery = parse_dir(root / SPLIT_DIRS["gallery"], allow_junk=True)
    _check_protocol(root, query, gallery)
    return Split(train=(), query=query, gallery=gallery, root=str(root))


def _check_protocol(root: Path, query: tuple[Record, ...], gallery: tuple[Record, ...]) -> None:
    """Every query id needs a gallery image of itself from another camera, or it could never be matched."""
    cams: dict[int, set[int]] = {}
    for r in gallery:
        cams.setdefault(r.pid, set()).add(r.camid)
    missing = sorted({q.pid for q in query if not cams.get(q.pid, set()) - {q.camid}})
    if missing:
        raise ValueError(
            f"{root}: {len(missing)} query ids have no gallery image from another camera in "
            f"{SPLIT_DIRS['gallery']} (first: {missing[:10]}); the query/gallery folders do not belong together")
