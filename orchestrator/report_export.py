"""The report's tables as data, and each format they are written in: text (the console), csv, markdown, latex.

A :class:`Table` is a name (a file name: ``setting-1a2b3c4d``, ``contrasts-1a2b3c4d-rr``, ``domains``,
``pool-quality``), the line printed above it, its columns and rows of typed cells: a ``Summary`` (n, mean ± std
[±95% half-width]), a ``Paired`` difference (Δ [±half-width] p), a p-value, a :class:`Count` (n, paired n, of
trials), a :class:`Num` (a number with its printed text) or plain text. Every format prints the same numbers:
text, markdown and latex the console's cells, csv each part of a cell in a column of its own, at full precision
(``rank-1 mean``, ``rank-1 std``, ``rank-1 ci95``; ``Δr1 vs baseline``, ``... ci95``, ``... p``), so that a
spreadsheet reads it back.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from orchestrator.stats import Paired, Summary
from orchestrator.tables import cell, format_table

FORMATS = ("text", "csv", "markdown", "latex")


@dataclass(frozen=True)
class Num:
    """A number printed as ``text`` (``1.86x``, ``+6.29``); csv writes the number."""

    value: float
    text: str


@dataclass(frozen=True)
class Count:
    """A group's n: its finished seeds, the paired n of its difference (where fewer), its trials (where some
    stopped)."""

    n: int
    paired: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class Col:
    """A column: its header, what its cells are (value, summary, interval, diff, p, count), its alignment (l / r)
    and its csv name where the header repeats (the paper's rank-1 beside ours)."""

    header: str
    kind: str = "value"
    align: str = "r"
    key: str | None = None

    def csv_headers(self) -> list[str]:
        h = self.key or self.header
        return [f"{h}{s}" for s in _PARTS[self.kind]]


_PARTS = {"value": ("",), "p": ("",), "summary": (" mean", " std", " ci95"), "interval": (" mean", " ci95"),
          "diff": ("", " ci95", " p"), "count": ("", " paired", " total")}


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    cols: tuple[Col, ...]
    rows: tuple[tuple[Any, ...], ...]

    def __post_init__(self) -> None:
        bad = [r for r in self.rows if len(r) != len(self.cols)]
        if bad:
            raise ValueError(f"table {self.name}: a row has {len(bad[0])} cells for {len(self.cols)} columns")


# ------------------------------------------------------------------------------------------ cells

def text_cell(kind: str, v: Any) -> str:
    """A cell as the console prints it (``-`` for nothing)."""
    if v is None:
        return "-"
    if isinstance(v, Num):
        return v.text
    if isinstance(v, Summary):
        ci = "" if v.ci is None else f" [±{v.ci:.2f}]"
        return f"{v.mean:.2f} ± {v.std:.2f}{ci}" if kind == "summary" else (
            f"{v.mean:.2f}" + ("" if v.ci is None else f" ± {v.ci:.2f}"))
    if isinstance(v, Paired):
        ci = "" if v.ci is None else f" [±{v.ci:.2f}]"
        return f"{v.mean:+.2f}{ci}" + ("" if v.p is None else f" p={v.p:.2f}")
    if isinstance(v, Count):
        if v.total is not None and v.total != v.n:
            return f"{v.n}/{v.total}"
        return str(v.n) if v.paired is None or v.paired == v.n else f"{v.n} ({v.paired} paired)"
    if kind == "p" and isinstance(v, float):
        return f"{v:.2f}"
    return cell(v)


def csv_cells(kind: str, v: Any) -> list[Any]:
    """A cell's parts, one per csv column of its kind ("" for nothing)."""
    width = len(_PARTS[kind])
    if isinstance(v, Summary):
        parts = [v.mean, v.std, v.ci] if kind == "summary" else [v.mean, v.ci]
    elif isinstance(v, Paired):
        parts = [v.mean, v.ci, v.p]
    elif isinstance(v, Count):
        parts = [v.n, v.paired, v.total]
    else:
        parts = [v.value if isinstance(v, Num) else v]
    parts = ["" if p is None else p for p in parts]
    return parts + [""] * (width - len(parts))


# ------------------------------------------------------------------------------------------ formats

def to_text(t: Table) -> str:
    """The title line and the padded table (what the console shows)."""
    body = [[text_cell(c.kind, v) for c, v in zip(t.cols, r)] for r in t.rows]
    return t.title + "\n" + format_table([c.header for c in t.cols], body, align="".join(c.align for c in t.cols))


def to_csv(t: Table) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([h for c in t.cols for h in c.csv_headers()])
    for r in t.rows:
        w.writerow([p for c, v in zip(t.cols, r) for p in csv_cells(c.kind, v)])
    return out.getvalue()


def to_markdown(t: Table) -> str:
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [f"**{t.title}**", "", row([c.header for c in t.cols]),
             "|" + "|".join(":---" if c.align == "l" else "---:" for c in t.cols) + "|"]
    lines += [row([text_cell(c.kind, v) for c, v in zip(t.cols, r)]) for r in t.rows]
    return "\n".join(lines)


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
          "×": r"$\times$"}


def latex_escape(s: str) -> str:
    """Text safe in a LaTeX cell: the special characters escaped, ± Δ × as math."""
    return "".join(_LATEX.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), the title as a comment above it."""
    def row(cells: Sequence[str]) -> str:
        return " & ".join(latex_escape(c) for c in cells) + r" \\"

    lines = [*(f"% {ln}" for ln in t.title.splitlines()), rf"\begin{{tabular}}{{{''.join(c.align for c in t.cols)}}}",
             r"\toprule", row([c.header for c in t.cols]), r"\midrule"]
    lines += [row([text_cell(c.kind, v) for c, v in zip(t.cols, r)]) for r in t.rows]
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])


RENDER = {"text": to_text, "csv": to_csv, "markdown": to_markdown, "latex": to_latex}
SUFFIX = {"text": "txt", "csv": "csv", "markdown": "md", "latex": "tex"}


def render(tables: Sequence[Table], fmt: str) -> str:
    """Every table in ``fmt``; csv: each after a ``# <table name>`` line, separated by a blank line."""
    if fmt not in RENDER:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return "\n".join(f"# {t.name}\n{to_csv(t)}" for t in tables).rstrip("\n")
    return "\n\n".join(RENDER[fmt](t) for t in tables)


def write_tables(tables: Sequence[Table], fmt: str, folder: Path) -> list[Path]:
    """csv: one file per table (``<name>.csv``); markdown and latex: one file of every table (``report.md``,
    ``report.tex``). Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        paths = []
        for t in tables:
            (path := folder / f"{t.name}.csv").write_text(to_csv(t))
            paths.append(path)
        return paths
    path = folder / f"report.{SUFFIX[fmt]}"
    path.write_text(render(tables, fmt) + "\n")
    return [path]
