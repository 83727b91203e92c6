"""Published numbers the report compares against (percent, exactly as printed; every one a single run).

Source: Huang et al., IEEE TIP 28(3) 2019 (docs/protocol.md lists them beside our settings): Table IV
(Market-1501, identification net, by number of generated images), Table III (identification net on other datasets,
24,000 generated images) and Table VII (two-stream net; its last column re-ranked). Each dataset is compared only
with its own published numbers; our synthetic set has none, so its runs are shown beside Market-1501's as a
reference for the *gain*, and labelled so. Re-ranked: the paper re-ranks only two-stream + dMpRL-II (Table VII);
cross-domain (trained on one dataset, tested on another): the paper publishes none. Nothing else is made up.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainables.methods import BASELINE

TRAIN_IMAGES = {"market1501": 12936, "dukemtmc": 16522}  # the paper's training sets (ratio = #GAN / this)
TABLE_III_GAN = 24000  # generated images behind Tables III and VII

# Table IV, Market-1501, identification net: method -> {num_gan: (mAP, rank1)}
TABLE_IV: dict[str, dict[int, tuple[float, float]]] = {
    "allinone": {12000: (55.68, 76.96), 18000: (55.59, 77.40), 24000: (56.07, 77.21), 30000: (56.19, 77.17),
                 36000: (55.24, 75.92), 48000: (53.98, 75.16)},
    "pseudo": {12000: (55.69, 76.52), 18000: (56.04, 77.95), 24000: (56.90, 77.62), 30000: (56.54, 77.95),
               36000: (56.38, 77.42), 48000: (55.86, 76.72)},
    "lsro": {12000: (55.22, 77.17), 18000: (55.28, 76.96), 24000: (56.33, 78.21), 30000: (55.40, 77.46),
             36000: (55.82, 77.91), 48000: (54.87, 76.90)},
    "smprl": {12000: (55.27, 77.73), 18000: (55.05, 77.73), 24000: (55.59, 78.85), 30000: (55.76, 77.82),
              36000: (55.45, 78.32), 48000: (55.02, 77.45)},
    "dmprl1": {12000: (55.84, 77.88), 18000: (56.21, 78.36), 24000: (56.10, 77.79), 30000: (57.15, 78.65),
               36000: (57.42, 78.95), 48000: (56.01, 77.57)},
    "dmprl2": {12000: (58.14, 79.22), 18000: (58.31, 79.81), 24000: (58.59, 80.37), 30000: (57.69, 79.16),
               36000: (57.61, 79.90), 48000: (57.03, 78.73)},
}
TABLE_IV_BASELINE = (52.68, 74.08)  # the 0-image row of Table IV

# Table III, identification net at 24,000 generated images (Market-1501's row equals Table IV's 24k row)
TABLE_III: dict[str, dict[str, tuple[float, float]]] = {
    "dukemtmc": {"baseline": (42.20, 61.94), "lsro": (46.66, 66.92), "dmprl2": (48.58, 68.24)},
}

# Table VII, two-stream net, single query: dataset -> method -> (mAP, rank1); dMpRL-II at 24,000 images
TABLE_VII: dict[str, dict[str, tuple[float, float]]] = {
    "market1501": {"baseline": (64.09, 81.83), "dmprl2": (67.53, 85.75)},
    "dukemtmc": {"baseline": (51.40, 72.62), "dmprl2": (58.56, 76.81)},
}
# Table VII's last column, "+ dMpRL-II + re-ranking" (k-reciprocal, Zhong et al. 2017): dataset -> method -> (mAP,
# rank1); the only re-ranked numbers the paper prints (no re-ranked baseline, no identification net)
TABLE_VII_RERANKED: dict[str, dict[str, tuple[float, float]]] = {
    "market1501": {"dmprl2": (81.18, 87.96)},
    "dukemtmc": {"dmprl2": (74.54, 81.28)},
}
NO_CROSS_DOMAIN = "none published: no cross-domain numbers in the paper"
RATIO_TOLERANCE = 0.1  # a ratio this far (relative) outside the paper's range has no paper row


@dataclass(frozen=True)
class PaperRow:
    table: str  # e.g. "IV", "VII"
    num_gan: int  # the paper's #GAN of the matched row (0 = baseline)
    mAP: float
    rank1: float
    reference_only: bool = False  # another dataset's numbers shown for the gain (synthetic runs)


def ratio(num_gan: int, num_train: int) -> float | None:
    """Generated/real ratio of a run (what the paper's rows are matched on)."""
    return num_gan / num_train if num_train > 0 else None


def paper_row(dataset: str, model: str, method: str, num_gan: int, num_train: int, *, domain: str = "",
              reranked: bool = False) -> tuple[PaperRow | None, str]:
    """The published row for one of our settings, and a note saying why there is none (or which was matched).
    ``domain``: the other dataset a cross-domain evaluation tested on; ``reranked``: the distances re-ranked."""
    if domain:
        return None, NO_CROSS_DOMAIN
    if dataset == "cuhk03np":
        return None, "the paper used detected CUHK03 (1,367 ids, its own protocol), not CUHK03-np"
    reference = dataset == "synthetic"
    table_ds = "market1501" if reference else dataset
    if table_ds not in TRAIN_IMAGES:
        return None, f"no published numbers for dataset {dataset!r}"
    if reranked:
        if model != "twostream" or num_gan == 0 or method not in TABLE_VII_RERANKED.get(table_ds, {}):
            return None, "none published: Table VII re-ranks two-stream dMpRL-II only"
        return _single_row("VII+rr", TABLE_VII_RERANKED[table_ds], table_ds, method, num_gan, num_train, reference)
    if model == "twostream":
        return _single_row("VII", TABLE_VII.get(table_ds, {}), table_ds, method, num_gan, num_train, reference)
    if table_ds != "market1501":
        return _single_row("III", TABLE_III.get(table_ds, {}), table_ds, method, num_gan, num_train, reference)
    return _table_iv(method, num_gan, num_train, reference)


def _table_iv(method: str, num_gan: int, num_train: int, reference: bool) -> tuple[PaperRow | None, str]:
    if method == BASELINE or num_gan == 0:
        return PaperRow("IV", 0, *TABLE_IV_BASELINE, reference), "Table IV baseline"
    table, r = TABLE_IV.get(method), ratio(num_gan, num_train)
    if not table or r is None:
        return None, f"no Table IV row for method {method!r}"
    lo, hi = min(table) / TRAIN_IMAGES["market1501"], max(table) / TRAIN_IMAGES["market1501"]
    if not lo * (1 - RATIO_TOLERANCE) <= r <= hi * (1 + RATIO_TOLERANCE):
        return None, f"ratio {r:.2f}x is outside the paper's {lo:.2f}x-{hi:.2f}x"
    market = TRAIN_IMAGES["market1501"]
    n = min(table, key=lambda k: abs(k / market - r))
    return PaperRow("IV", n, *table[n], reference), f"ratio {r:.2f}x ~ Table IV {n} ({n / market:.2f}x)"


def _single_row(name: str, table: dict[str, tuple[float, float]], dataset: str, method: str, num_gan: int,
                num_train: int, reference: bool) -> tuple[PaperRow | None, str]:
    """Tables III and VII: a baseline and methods at 24,000 generated images only."""
    if method == BASELINE or num_gan == 0:
        return (PaperRow(name, 0, *table[BASELINE], reference), f"Table {name} baseline") if table else \
            (None, f"no Table {name} numbers for {dataset}")
    if method not in table:
        return None, f"Table {name} has no {method} row for {dataset}"
    r, want = ratio(num_gan, num_train), TABLE_III_GAN / TRAIN_IMAGES[dataset]
    if r is None or abs(r - want) > RATIO_TOLERANCE * want * 2.5:
        return None, f"ratio {r or 0:.2f}x is not near Table {name}'s {want:.2f}x (24,000 images)"
    return PaperRow(name, TABLE_III_GAN, *table[method], reference), f"ratio {r:.2f}x ~ Table {name} ({want:.2f}x)"
