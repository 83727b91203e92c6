"""Plots logged as run artifacts (PNG files): a trial's CMC curve, the report's paired gains. One style, drawn on
matplotlib's object-oriented Agg canvas (no pyplot, no global backend switch): headless-safe."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from orchestrator.groups import Group


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

    fig, ax = _figure((6.0, 4.5))
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
    return _save(fig, path)


def plot_gains(groups: Sequence["Group"], control: str, path: str | Path) -> Path:
    """Bar chart: each group's paired rank-1 gain over ``control`` with its 95% interval, beside the paper's gain."""
    rows = [g for g in groups if (g.vs.get(control) or {}).get("rank1")]
    labels = [f"{g.method}\n{g.num_gan}" + ("" if g.order == "paper" else "\n(code order)")
              + ("" if g.pool in ("gan", "-") else f"\n({g.pool})") for g in rows]
    gains = [g.vs[control]["rank1"] for g in rows]
    xs = list(range(len(rows)))
    fig, ax = _figure((max(5, 1.1 * len(rows) + 2), 4))
    n = max((d.n for d in gains), default=0)
    ours = f"ours (mean, 95% interval; n={n})" if n > 1 else "ours (one seed: no interval, no finding)"
    ax.bar([x - 0.2 for x in xs], [d.mean for d in gains], 0.4, yerr=[d.ci or 0 for d in gains], capsize=3,
           label=ours, color="#3572b0")
    reference = any(g.paper and g.paper.reference_only for g in rows)
    matched = [(x, g.paper_gain_rank1) for x, g in zip(xs, rows) if g.paper_gain_rank1 is not None]
    if matched:  # a bar only where a paper row was matched: no row is no bar, never a zero one
        ax.bar([x + 0.2 for x, _ in matched], [v for _, v in matched], 0.4, color="#d9822b",
               label="paper (Market-1501" + (", reference)" if reference else ")"))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel(f"rank-1 gain over {control} (points)")
    ax.set_title(f"Paired rank-1 gain over the {control}")
    ax.legend()
    return _save(fig, path)


def _figure(size: tuple[float, float]) -> tuple[Any, Any]:

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
