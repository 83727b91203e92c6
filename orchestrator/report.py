"""``python -m orchestrator.report``: one sweep's results with honest statistics, beside the paper's numbers.

Per group of trials that differ only in the seed: n, mean ± std and the 95% interval of rank-1 and mAP. Per label
method: the paired per-seed difference from each control (the baseline; the compute-matched baseline and the
unlabelled control where swept) with its interval and a paired t-test; then the paper's own claims as paired
contrasts between methods (dMpRL-II vs LSRO, dMpRL-II vs dMpRL-I, dMpRL-I vs sMpRL, sMpRL vs LSRO; the code's rank
order vs the paper's; a pool vs the DCGAN's) at each #GAN present. Every p-value the report prints for a metric is
one family: Holm-adjusted over it (its size printed, the raw p kept), and the plain verdict ("better", "worse", "no
detectable difference at n=3") comes from the adjusted p. A group with trials a scheduler (ASHA) stopped is listed
with them ("2 of 3 seeds stopped after 4 epochs") and gets no verdict. Groups never mix settings: every config
field that is not swept (dataset, preset, backbone, epochs, image size, label hyperparameters, AP mode, ...) goes
into a hash that is part of the group (:mod:`orchestrator.groups`). Each evaluation of the final models (as trained,
BN re-estimated, re-ranked, on another dataset: :mod:`orchestrator.evaluations`) gets blocks of its own, and a
domains table sets them side by side. By default the latest sweep is reported; ``--sweep`` picks another (its
parent run id or name). ``--format`` prints the tables as text, csv, markdown or latex
(:mod:`orchestrator.report_export`). The text, the tables (csv) and the chart go to MLflow; the group statistics
become metrics of the sweep's parent run and the trial runs get their group tags (:mod:`orchestrator.report_mlflow`).

Ranking metrics are read in percent: a run tagged ``mprl.metric_unit = percent`` as logged, an older run (no tag:
fractions) times 100.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

FORMATS = ("text", "csv", "markdown", "latex")  # = report_export.FORMATS (not imported: --help stays fast)
# the report's public names, imported when first asked for (python -m orchestrator.report --help imports nothing)
_LAZY = {**dict.fromkeys(("AS_TRAINED", "BN_RECALIBRATED", "CONTROLS", "SWEPT", "Contrast", "Group", "Settings",
                          "TrialResult", "family_size", "pool_label", "setting_of", "summarise", "group_tags"),
                         "orchestrator.groups"),
         "format_report": "orchestrator.report_tables", "tables_of": "orchestrator.report_tables"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def latest_sweep(client, exp_id: str) -> tuple[str, str] | None:
    """(parent run id, name) of the most recently started sweep of the experiment."""
    from orchestrator import tracking

    runs = client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = 'sweep'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return (runs[0].info.run_id, runs[0].info.run_name) if runs else None


def find_sweep(client, exp_id: str, ref: str) -> tuple[str, str]:
    """A sweep by parent run id or by name; ValueError naming what exists otherwise."""
    from orchestrator import tracking

    runs = client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = 'sweep'", max_results=5000)
    for r in runs:
        if ref in (r.info.run_id, r.info.run_name):
            return r.info.run_id, r.info.run_name
    names = ", ".join(r.info.run_name for r in runs[:10]) or "none"
    raise ValueError(f"--sweep {ref!r}: no such sweep in this experiment (sweeps: {names})")


def trial_runs(client, exp_id: str, parent: str) -> list:
    """Every trial run of the sweep, whatever its status."""
    from orchestrator import tracking

    filt = f"tags.`{tracking.TAG_KIND}` = 'trial' and tags.`{tracking.TAG_PARENT}` = '{parent}'"
    return client.search_runs([exp_id], filt, max_results=50000)


def collect(client, exp_id: str, parent: str, runs: list | None = None) -> list:
    """The sweep's finished trial runs (``runs``: :func:`trial_runs`, read again when not given) as
    ``TrialResult`` s in percent: one per evaluation each logged (``final_<prefix>rank1``), and one per evaluation
    the sweep has for each trial a scheduler (ASHA) stopped (no test metrics; the report lists them, so that a group
    is never silently its survivors)."""
    from orchestrator import tracking
    from orchestrator.evaluations import Evaluation, final_metrics
    from orchestrator.groups import TrialResult, pool_of, setting_of

    rows, stopped = [], []
    for r in runs if runs is not None else trial_runs(client, exp_id, parent):
        p, tags = r.data.params, r.data.tags
        evals = final_metrics(r.data.metrics)
        is_stopped = tags.get(tracking.TAG_EARLY_STOPPED) == "true"
        if r.info.status != "FINISHED" or (Evaluation() not in evals and not is_stopped):
            continue
        unit = 1.0 if tags.get(tracking.TAG_UNIT) == tracking.PERCENT else 100.0  # no tag: an older run, fractions
        row = TrialResult(
            setting=setting_of(p), preset=p.get("preset", "?"), dataset=p.get("dataset.name", "synthetic"),
            model=p.get("reid.model", "ident"), method=p.get("labels.method"), num_gan=int(p.get("labels.num_gan", 0)),
            order=p.get("labels.order", "paper"), keep=p.get("labels.keep", "None"), seed=int(p.get("reid.seed", 0)),
            num_train=int(p.get("data.num_train", 0) or 0),
            single_baseline=p.get("sweep.single_baseline", "False") == "True",
            lr_scheme=p.get("reid.lr_scheme", "paper"), pool=pool_of(p),
            stopped_after=int(float(tags.get(tracking.TAG_STOPPED_AFTER, 0))) if is_stopped else None)
        if is_stopped:  # no verdict on it: its test metrics, if any, are not read
            stopped.append(row)
            continue
        rows += [dataclasses.replace(row, evaluation=e.label, rank1=unit * v["rank1"], mAP=unit * v["mAP"])
                 for e, v in evals.items()]
    labels: dict[str, dict[str, None]] = {}  # the evaluations of each setting, in order
    for r in rows:
        labels.setdefault(r.setting, {})[r.evaluation] = None
    return rows + [dataclasses.replace(s, evaluation=e) for s in stopped
                   for e in labels.get(s.setting) or [s.evaluation]]


def pool_quality_runs(client, exp_id: str, parent: str) -> list:
    """(stage key, PoolQualityOut) of each generated pool the sweep used (its pool_quality stage runs)."""
    from orchestrator import tracking
    from orchestrator.stage_cache import PoolQualityOut

    filt = (f"tags.`{tracking.TAG_KIND}` = 'stage' and attributes.status = 'FINISHED' and "
            f"tags.`{tracking.TAG_PARENT}` = '{parent}' and tags.`{tracking.TAG_KEY}` LIKE 'pool_quality:%'")
    return [(r.data.tags[tracking.TAG_KEY].split(":", 1)[1],
             PoolQualityOut.from_metrics(r.data.metrics, r.data.params.get("sheet", "?"),
                                         r.data.params.get("rendering", "?")))
            for r in client.search_runs([exp_id], filt, max_results=100)]


def pool_quality(client, exp_id: str, parent: str) -> str:
    """The quality of each generated pool the sweep used, one paragraph each, or ""."""
    return "\n".join(q.summary() for _, q in pool_quality_runs(client, exp_id, parent))


@dataclasses.dataclass(frozen=True)
class Report:
    """One sweep's report: its groups, tables and console text."""

    groups: list
    tables: list
    text: str  # the statistics and the pools, as the console prints them


def build(client, exp_id: str, parent: str, *, log: bool = True) -> Report:
    """Read the sweep, summarise it; with ``log``: the trial runs' group tags, the statistics on the parent run."""
    from orchestrator.groups import summarise
    from orchestrator.report_mlflow import log_statistics, tag_trials
    from orchestrator.report_tables import format_report, tables_of

    runs = trial_runs(client, exp_id, parent)
    groups = summarise(collect(client, exp_id, parent, runs))
    pools = pool_quality_runs(client, exp_id, parent)
    text = format_report(groups) if groups else "no finished trials: no statistics"
    text += "".join(f"\n\n{q.summary()}" for _, q in pools[:1]) + "".join(f"\n{q.summary()}" for _, q in pools[1:])
    report = Report(groups, tables_of(groups, pools), text)
    if log:
        tag_trials(client, runs)
        if groups:
            log_statistics(client, parent, groups, report.tables, text)
    return report


def sweep_statistics(tracking_uri: str, experiment: str, storage: Path, parent: str) -> str:
    """The statistics block of one sweep (what the sweep prints after its per-trial table), then its pools' quality;
    the trial runs' group tags and the group statistics go to MLflow (:func:`build`)."""
    from orchestrator import tracking

    client, exp_id = tracking.setup(tracking_uri, experiment, storage)
    return build(client, exp_id, parent).text


def open_store(uri: str, experiment: str):
    """(client, experiment id) of an existing store and experiment; ValueError / ConnectionError naming what is
    missing (a read: no database file is created, no experiment either)."""
    from orchestrator import tracking

    tracking.check_reachable(uri)
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if db is not None and not Path(db).is_file():
        raise ValueError(f"no MLflow store at {db}: not a sweep's storage folder, or its sweep has not started")
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments(max_results=20)) or "none"
        raise ValueError(f"--experiment {experiment!r}: no such experiment at {uri} (experiments: {names})")
    return client, exp.experiment_id


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.report",
                                description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--experiment", default="mprl", help="the MLflow experiment of the sweep (default: mprl)")
    p.add_argument("--storage", default="runs",
                   help="the sweep's cluster.storage_path; its mlflow.db is the default store (default: runs)")
    p.add_argument("--tracking-uri", default=None,
                   help="an MLflow tracking URI (http://host:5000, sqlite:///path) (default: sqlite:///<--storage>"
                        "/mlflow.db)")
    p.add_argument("--sweep", default=None, help="a sweep's parent run id or name (default: the latest sweep)")
    p.add_argument("--format", default="text", choices=FORMATS,
                   help="how the tables print: text (the console's), csv (each table after a '# <name>' line), "
                        "markdown (pipe tables) or latex (booktabs tabulars) (default: text)")
    p.add_argument("--out", default=None,
                   help="also write report.txt, the chart and the tables here (csv: one file per table; markdown / "
                        "latex: report.md / report.tex) (default: none, MLflow only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from trainables.logs import configure_logging

    configure_logging()
    storage = Path(args.storage).resolve()
    uri = args.tracking_uri or f"sqlite:///{storage / 'mlflow.db'}"
    try:
        if not args.tracking_uri and not storage.is_dir():
            raise ValueError(f"--storage {args.storage}: no such folder ({storage}); pass the sweep's "
                             f"cluster.storage_path or --tracking-uri")
        client, exp_id = open_store(uri, args.experiment)
        found = find_sweep(client, exp_id, args.sweep) if args.sweep else latest_sweep(client, exp_id)
    except (ValueError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = build(client, exp_id, found[0]) if found else None
    if report is None or not report.groups:
        print(f"no finished trials in experiment {args.experiment!r} at {uri}", file=sys.stderr)
        return 1
    return _output(args, client, exp_id, found, report)


def document(report: Report, fmt: str, header: str) -> str:
    """The whole report in ``fmt``: text as the console prints it; csv the tables only; markdown and latex the
    tables with the notes beside them (the multiplicity, how to read a cell) as paragraphs or comments."""
    from orchestrator.report_export import render
    from orchestrator.report_tables import notes

    if fmt == "text":
        return f"{header}\n\n{report.text}"
    body = render(report.tables, fmt)
    if fmt == "markdown":
        return "\n\n".join([f"# {header}", body, *notes(report.groups)])
    if fmt == "latex":
        comments = ["\n".join(f"% {ln}" for ln in n.splitlines()) for n in notes(report.groups)]
        return "\n\n".join([f"% {header}", body, *comments])
    return body


def _output(args: argparse.Namespace, client, exp_id: str, found: tuple[str, str], report: Report) -> int:
    from orchestrator import tracking
    from orchestrator.groups import AS_TRAINED
    from orchestrator.plots import plot_gains
    from orchestrator.report_export import SUFFIX, write_tables
    from trainables.methods import BASELINE

    header = f"sweep {found[1]} (parent run {found[0]})"
    doc = document(report, args.format, header)
    print(doc)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(document(report, "text", header) + "\n")
        chart = plot_gains([g for g in report.groups if g.method != BASELINE and g.evaluation == AS_TRAINED],
                           BASELINE, out / "comparison.png")  # the controls too
        files = []
        if args.format == "csv":
            files = write_tables(report.tables, "csv", out)
        elif args.format != "text":
            (path := out / f"report.{SUFFIX[args.format]}").write_text(doc + "\n")
            files = [path]
        run_id, _ = tracking.get_or_create_run(client, exp_id, "report", found[0], "report")
        tracking.log_artifacts(client, run_id, [out / "report.txt", chart, *files], "report")
        tracking.set_status(client, run_id, "FINISHED")
    print(f"\nchart and tables logged to MLflow run {run_id} (group statistics: sweep run {found[0]})"
          + (f" and written to {out}" if args.out else ""), file=sys.stdout if args.format == "text" else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
