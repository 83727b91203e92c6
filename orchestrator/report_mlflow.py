"""The report's groups in MLflow: group tags on the trial runs, group statistics and the tables on the sweep's run.

Tags (:func:`tag_trials`): every trial run of the sweep carries ``mprl.setting`` (the setting hash the report groups
by) and ``mprl.group`` (``<method> pool=<pool> gan=<#GAN> order=<order> keep=<keep> setting=<hash>``,
:func:`orchestrator.groups.group_tags`); the report adds them to runs that lack them (older runs) or corrects a
stale one, so that grouping runs by ``mprl.group`` in MLflow's UI reproduces the report's groups.

Metrics (:func:`group_metrics`), logged on the sweep's parent run, one name per statistic::

    <setting>/<method>/<pool>/<#GAN>[/order-<order>][/keep-<keep>][/<evaluation>].<statistic>

(order and keep only where not the paper's ``paper`` / ``None``; the evaluation is its metric prefix without the
last underscore: ``bnr``, ``rr``, ``xd_dukemtmcreid``, ``xd_dukemtmcreid_rr``; characters MLflow refuses become
``_``). Statistics, in percent (points for differences): ``n`` (finished seeds), ``n_stopped`` (trials a
scheduler stopped), ``rank1_mean``, ``rank1_std``, ``rank1_ci95`` (half-width of the 95% t interval), the same for
``mAP``; per reference ``<ref>`` (each control: ``baseline``, ``baseline_matched``, ``unlabelled``; each contrast's
other side: its method, ``paper_order``, ``gan_pool``) ``drank1_vs_<ref>`` (the paired mean difference),
``drank1_vs_<ref>_ci95``, ``_p`` (raw), ``_p_holm`` (Holm over the report's family), ``_n`` (paired seeds), and
the same for ``dmAP``. Plus ``report.family_rank1`` / ``report.family_mAP`` (the family sizes) and
``report.groups``. Absent values (one seed: no interval, no p) are not logged. Artifacts: ``report/report.txt``
and one csv per table, ``report/<table name>.csv``.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path
from typing import Sequence

from orchestrator import tracking
from orchestrator.evaluations import from_label
from orchestrator.groups import CONTROLS, METRIC_NAMES, Group, family_size, group_tags
from orchestrator.report_export import Table, write_tables
from orchestrator.stats import Paired

_BAD = re.compile(r"[^A-Za-z0-9_\- ]")  # inside one part of a name ("/" and "." separate the parts)


def tag_trials(client, runs) -> int:
    """Set ``mprl.setting`` / ``mprl.group`` on each trial run whose tags lack them or differ; returns how many."""
    from mlflow.entities import RunTag

    n = 0
    for r in runs:
        if not r.data.params:
            continue
        want = group_tags(r.data.params)
        if any(r.data.tags.get(k) != v for k, v in want.items()):
            client.log_batch(r.info.run_id, tags=[RunTag(k, v) for k, v in want.items()])
            n += 1
    return n


def group_prefix(g: Group) -> str:
    """The group's part of a metric name: ``1a2b3c4d/lsro/gan/360``, ``.../order-reference_code/rr``."""
    parts = [g.setting, g.method, g.pool, str(g.num_gan)]
    parts += [f"order-{g.order}"] * (g.order != "paper") + [f"keep-{g.keep}"] * (g.keep != "None")
    slug = from_label(g.evaluation).slug
    return "/".join(_BAD.sub("_", p) or "_" for p in parts + [slug] * bool(slug))


def group_metrics(groups: Sequence[Group]) -> dict[str, float]:
    """Every group's statistics as MLflow metrics (the names in the module docstring)."""
    out: dict[str, float | None] = {"report.groups": len(groups), "report.family_rank1": family_size(groups, "rank1"),
                                    "report.family_mAP": family_size(groups, "mAP")}
    for g in groups:
        at = group_prefix(g)
        out[f"{at}.n"] = len(g.seeds)
        out[f"{at}.n_stopped"] = len(g.stopped) or None
        for m in METRIC_NAMES:
            s = getattr(g, m)
            if s is not None:
                out.update({f"{at}.{m}_mean": s.mean, f"{at}.{m}_std": s.std, f"{at}.{m}_ci95": s.ci})
        refs = [(c, (g.vs.get(c) or {})) for c in CONTROLS] + [(c.key, c.diffs) for c in g.contrasts]
        for ref, diffs in refs:
            for m in METRIC_NAMES:
                out.update(_diff(f"{at}.d{m}_vs_{_BAD.sub('_', ref)}", diffs.get(m)))
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _diff(name: str, d: Paired | None) -> dict[str, float | None]:
    if d is None:
        return {}
    return {name: d.mean, f"{name}_ci95": d.ci, f"{name}_p": d.p, f"{name}_p_holm": d.p_adj, f"{name}_n": d.n}


def log_statistics(client, parent: str, groups: Sequence[Group], tables: Sequence[Table], text: str) -> int:
    """The group statistics as metrics of the sweep's parent run, the text and the csv tables as its artifacts
    (``report/``); returns the number of metrics logged."""
    from mlflow.entities import Metric

    metrics = group_metrics(groups)
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, 0) for k, v in metrics.items()]  # as they are: already percent (not log_metrics)
    for i in range(0, len(items), 1000):  # MLflow's limit per batch
        client.log_batch(parent, metrics=items[i:i + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        (txt := Path(tmp) / "report.txt").write_text(text + "\n")
        tracking.log_artifacts(client, parent, [txt, *write_tables(tables, "csv", Path(tmp))], "report")
    return len(metrics)
