"""Plain data shared by every dataset: frozen records, a split, and the one pid -> class relabelling."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

JUNK_PID = -1  # Market-1501: junk detections, ignored in evaluation
DISTRACTOR_PID = 0  # Market-1501: distractors, ordinary negatives in evaluation


@dataclass(frozen=True, order=True)
class Record:
    """One image. ``label`` is the contiguous training class (-1 when not a training image).

    Generated images are records too: ``generated=True``, ``pid=-1``, ``camid=-1`` and ``gen_row`` = their
    row in the generated-image store (where their static targets live), so the training loop has no
    special path for them.
    """

    path: str
    pid: int
    camid: int
    label: int = -1
    generated: bool = False
    gen_row: int = -1


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
