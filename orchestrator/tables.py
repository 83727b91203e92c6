"""One plain-text table formatter for the sweep's results, the report and the benchmarks."""

from __future__ import annotations

from typing import Any, Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str | None = None) -> str:
    """Columns padded to their widest cell under one header rule.

    ``align``: one letter per column, ``l`` or ``r`` (default: the first column left, the others right).
    ``None`` prints as ``-``; floats as in :func:`cell`; trailing blanks are stripped.
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align={align!r} must have one letter per column ({len(header)})")
    cells = [[str(c) for c in header]] + [[cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    return "\n".join([line(cells[0]), "-" * len(line(cells[0]))] + [line(r) for r in cells[1:]])


def cell(value: Any) -> str:
    """A table cell: ``-`` for None, 3 significant-ish decimals for floats, ``str`` otherwise."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def pct(value: float | None) -> str | None:
    """A fraction in [0, 1] as a percentage with two decimals (None stays None)."""
    return None if value is None else f"{100 * value:.2f}"
