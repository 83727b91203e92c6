"""Plain data shared by every dataset: frozen records, a split, and the one pid -> class relabelling."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

JUNK_PID = -1  # Market-1501: junk detections, ignored in evaluation
DISTRACTOR_PID = 0  # Market-1501: distractors, ordinary negatives in evaluation


@dataclass(frozen=True, order=True)
class Record:
    """One image. ``label`` is the contiguous training class (-1 when not a training image).

    Generated images are records too: ``generated=True``, ``pid=-1``, ``camid=-1`` and ``gen_row`` = their
    row in the generated-image store (where their static targets live), so the training loop has no
    special path for them. ``shard_row >= 0``: ``path`` is a shard file (uint8 [B, H, W, 3]) and the image is
    that row of it (``datasets.images.read_record``); -1 for an ordinary image file.
    """

    path: str
    pid: int
    camid: int
    label: int = -1
    generated: bool = False
    gen_row: int = -1
    shard_row: int = -1


@dataclass(frozen=True)
class Split:
    """A re-ID dataset: training images and the query/gallery evaluation protocol."""

    train: tuple[Record, ...]
    query: tuple[Record, ...]
    gallery: tuple[Record, ...]
    root: str = ""

    @property
    def num_train_ids(self) -> int:
        return len({r.pid for r in self.train})

    def summary(self) -> str:
        def ids(rs: Sequence[Record]) -> int:
            return len({r.pid for r in rs if r.pid > 0})

        cams = len({r.camid for r in (*self.train, *self.query, *self.gallery)})
        return (f"train {len(self.train)} images / {ids(self.train)} ids; query {len(self.query)} / "
                f"{ids(self.query)} ids; gallery {len(self.gallery)} / {ids(self.gallery)} ids; {cams} cameras")


def relabel(records: Iterable[Record]) -> tuple[tuple[Record, ...], dict[int, int]]:
    """Give training records contiguous labels 0..K-1 in ascending pid order (deterministic).

    This is the only place pids become class indices. Generated records keep label -1.
    """
    records = tuple(records)
    pids = sorted({r.pid for r in records if not r.generated})
    pid2label = {pid: i for i, pid in enumerate(pids)}
    out = tuple(r if r.generated else replace(r, label=pid2label[r.pid]) for r in records)
    return out, pid2label


def hold_out(split: Split, num_ids: int, rng: np.random.Generator) -> tuple[Split, Split]:
    """(training split without ``num_ids`` identities, a validation split built from them).

    The validation split follows the test protocol: per held-out identity and camera one image is a query and
    the rest are gallery images, so every query has a cross-camera match. Only identities seen by two cameras or
    more are held out, drawn from ``rng`` (the training code passes the same one for every seed: one validation set
    per dataset).
    The remaining training images are relabelled 0..K'-1. For model selection and early stopping, never the test set.
    """
    by_pid: dict[int, list[Record]] = {}
    for r in split.train:
        by_pid.setdefault(r.pid, []).append(r)
    eligible = sorted(p for p, rs in by_pid.items() if len({r.camid for r in rs}) >= 2)
    if not 1 <= num_ids <= len(eligible) or num_ids >= len(by_pid) - 1:
        raise ValueError(f"reid.val_ids={num_ids}: {split.root or 'the dataset'} has {len(by_pid)} training ids, "
                         f"{len(eligible)} of them in 2+ cameras; hold out 1..{min(len(eligible), len(by_pid) - 2)}")
    held = set(rng.choice(eligible, size=num_ids, replace=False).tolist())
    query, gallery = [], []
    for pid in sorted(held):
        for cam in sorted({r.camid for r in by_pid[pid]}):
            shots = sorted(r for r in by_pid[pid] if r.camid == cam)
            query.append(shots[0])
            gallery.extend(shots[1:])
    train, _ = relabel(r for r in split.train if r.pid not in held)
    val = Split(train=(), query=tuple(query), gallery=tuple(gallery), root=split.root)
    return Split(train=train, query=split.query, gallery=split.gallery, root=split.root), val
