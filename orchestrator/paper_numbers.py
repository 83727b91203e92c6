"""Published Market-1501 numbers the report compares against (percent, exactly as printed).

Source: Huang et al., IEEE TIP 28(3) 2019, Table IV (identification net, mAP / rank-1 by number of generated
images) and Table VII (two-stream net); see shared/research/mprl.md §5. Every number is a single run.
"""

from __future__ import annotations

MARKET_TRAIN_IMAGES = 12936

# method -> {num_gan: (mAP, rank1)}
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
BASELINE = (52.68, 74.08)  # the 0-image row of Table IV

# Table VII, two-stream net, single query: (mAP, rank1)
TABLE_VII = {"twostream": (64.09, 81.83), "twostream+dmprl2": (67.53, 85.75),
             "twostream+dmprl2+rerank": (81.18, 87.96)}


def paper_row(method: str, num_gan: int, num_train: int) -> tuple[int, tuple[float, float]] | None:
    """The Table IV entry whose generated/real ratio is closest to ours: (paper #GAN, (mAP, rank1))."""
    if method == "baseline" or num_gan == 0:
        return 0, BASELINE
    table = TABLE_IV.get(method)
    if not table or num_train <= 0:
        return None
    scaled = num_gan / num_train * MARKET_TRAIN_IMAGES
    n = min(table, key=lambda k: abs(k - scaled))
    return n, table[n]
