"""Plots logged as run artifacts (PNG files). matplotlib is imported lazily, through the object-oriented
Agg canvas (no pyplot, no global backend switch), so importing this module stays cheap and headless-safe."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def plot_cmc(curves: Mapping[str, np.ndarray | Sequence[float]], path: str | Path, *, max_rank: int = 20,
             title: str | None = None) -> Path:
    """Write CMC curves (fractions in [0, 1], index 0 = rank 1) as a PNG, one line per run.

    Each legend entry is the run name with its rank-1 accuracy. Curves are cut at `max_rank` (or their
    own length if shorter). Returns the written path; missing parent folders are created.
    """
    if not curves:
        raise ValueError("curves is empty: pass {run_name: cmc_array}")
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    checked = {}
    for name, cmc in curves.items():
        arr = np.asarray(cmc, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"curves[{name!r}] must be a non-empty 1-D array, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(f"curves[{name!r}] must hold fractions in [0, 1] (not percentages)")
        checked[name] = arr[:max_rank]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, arr in checked.items():
        ranks = np.arange(1, len(arr) + 1)
        ax.plot(ranks, 100.0 * arr, marker="o", markersize=3, label=f"{name} (rank-1 {100.0 * arr[0]:.1f}%)")
    longest = max(len(arr) for arr in checked.values())
    ax.set_xlim(1, max(longest, 2))
    ax.set_xticks(np.unique(np.linspace(1, longest, num=min(longest, 10)).round().astype(int)))
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title or "CMC")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
