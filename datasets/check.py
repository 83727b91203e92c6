"""Check every image of a Market-format dataset: ``python -m datasets.check ROOT`` lists all unreadable files.

Decoding ~30k JPEGs takes a while, so :func:`datasets.market1501.load` only parses names; run this once on a
new dataset (the pipeline runs it before any training starts).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from PIL import Image

from datasets.records import Record


def image_error(path: str) -> str | None:
    """None if the image decodes fully, else a one-line reason."""
    try:
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files that Image.verify() lets through
            if im.width < 2 or im.height < 2:
                return f"image too small ({im.width}x{im.height})"
    except Exception as err:  # PIL raises many types for corrupt data
        return f"{type(err).__name__}: {err}"
    return None


def bad_images(records: Iterable[Record], *, threads: int = 4) -> list[tuple[str, str]]:
    """``[(path, reason), ...]`` for every record whose image cannot be decoded, in path order."""
    paths = sorted({r.path for r in records})
    with ThreadPoolExecutor(threads) as pool:
        errors = list(pool.map(image_error, paths))
    return [(p, e) for p, e in zip(paths, errors) if e is not None]


def check_images(records: Iterable[Record]) -> None:
    """Raise ValueError listing every unreadable image at once."""
    bad = bad_images(records)
    if bad:
        lines = "\n".join(f"  {p}: {e}" for p, e in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        raise ValueError(f"{len(bad)} unreadable images:\n{lines}{more}")


def main(argv: list[str] | None = None) -> int:
    """0: every image decodes; 1: some do not (each listed); 2: the folder is not a Market-format dataset."""
    from datasets.market1501 import SPLIT_DIRS, load

    parser = argparse.ArgumentParser(prog="python -m datasets.check",
                                     description="Decode every image of a Market-format dataset; list each that fails.",
                                     epilog="exit status: 0 all images decode, 1 some do not, 2 not a dataset")
    parser.add_argument("root", help=f"the dataset folder, holding {', '.join(SPLIT_DIRS.values())} (Market format)")
    args = parser.parse_args(argv)
    try:
        split = load(args.root)
    except (FileNotFoundError, ValueError) as err:  # a missing folder or split, a name that does not parse
        where = "" if str(Path(args.root).expanduser()) in str(err) else f"{args.root}: "
        print(f"error: {where}{err}", file=sys.stderr)
        return 2
    print(split.summary())
    bad = bad_images((*split.train, *split.query, *split.gallery))
    for path, reason in bad:
        print(f"BAD {path}: {reason}")
    print(f"{len(bad)} unreadable images" if bad else "all images decode")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
