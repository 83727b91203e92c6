"""The report against a real MLflow store: one unit (percent) whatever version logged a run, one result per
evaluation logged, the group tags on the trial runs, the group statistics and tables on the sweep's run, and the
CLI's errors (a missing store, an unreachable server) in seconds without writing anything."""

import csv
import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric

from orchestrator import tracking
from orchestrator.config import flat_dict, load_config, replace
from orchestrator.groups import TAG_GROUP, TAG_SETTING, group_tags, setting_of, summarise
from orchestrator.report import build, collect, main, sweep_statistics, trial_runs
from orchestrator.report_mlflow import group_prefix
from orchestrator.trials import TrialSpec

ROOT = Path(__file__).resolve().parents[1]
SWEEP = "sweep-smoke-1"


@pytest.fixture
def store(tmp_path):
    """A sweep's parent run in a real sqlite store under tmp_path; ``add(spec, metrics, percent=...)`` adds a
    finished trial run made as a sweep makes it (SweepRun.child, the config's flat params, the final metrics)."""
    uri = tracking.default_tracking_uri(tmp_path)
    client, exp_id = tracking.setup(uri, "mprl", tmp_path)
    parent, _ = tracking.get_or_create_run(client, exp_id, "sweep", SWEEP, SWEEP)
    run = tracking.SweepRun(client, exp_id, SWEEP, parent, uri)
    cfg = load_config("smoke")

    def add(spec: TrialSpec, metrics: dict[str, float], *, percent: bool = True, stopped_after: int | None = None):
        rid, _ = run.child("trial", tracking.trial_key(SWEEP, spec.key), spec.key, status="SCHEDULED")
        tracking.log_params(client, rid, {**flat_dict(replace(cfg, **spec.overrides())), "trial": spec.key})
        tags = client.get_run(rid).data.tags
        if percent:
            client.set_tag(rid, tracking.TAG_UNIT, tracking.PERCENT)
        elif tracking.TAG_UNIT in tags:  # an older version's run: no unit tag
            client.delete_tag(rid, tracking.TAG_UNIT)
        if stopped_after is not None:
            client.set_tag(rid, tracking.TAG_EARLY_STOPPED, "true")
            client.set_tag(rid, tracking.TAG_STOPPED_AFTER, str(stopped_after))
        # the values exactly as each version stored them (percent, or fractions before mprl.metric_unit)
        now = int(time.time() * 1000)
        client.log_batch(rid, metrics=[Metric(f"final_{k}", v, now, 0) for k, v in metrics.items()])
        tracking.log_params(client, rid, {"data.num_train": 466, "data.num_classes": 12})
        tracking.set_status(client, rid, "FINISHED")
        return rid

    return client, exp_id, parent, uri, add


def _m(r1: float, scale: float = 1.0, prefix: str = "") -> dict[str, float]:
    """A trial's final metrics of one evaluation (``prefix``), in percent times ``scale``."""
    return {f"{prefix}rank1": r1 * scale, f"{prefix}mAP": (r1 - 20) * scale,
            f"{prefix}rank5": min(100, r1 + 10) * scale}


def test_percent_runs_and_older_fraction_runs_read_in_one_unit(store):
    client, exp_id, parent, _, add = store
    add(TrialSpec("baseline", 0, seed=0), _m(70.0))  # this version: percent, tagged
    add(TrialSpec("baseline", 0, seed=1), _m(72.0, 0.01), percent=False)  # older: 0.72, no tag
    rows = collect(client, exp_id, parent)
    assert sorted((r.seed, r.rank1, r.mAP) for r in rows) == [(0, 70.0, 50.0), (1, pytest.approx(72.0),
                                                                               pytest.approx(52.0))]
    (g,) = summarise(rows)
    assert g.rank1.mean == pytest.approx(71.0) and g.seeds == [0, 1]


def test_one_result_per_evaluation_logged(store):
    client, exp_id, parent, _, add = store
    for seed in (0, 1):
        m = {**_m(70.0 + seed), **_m(75.0 + seed, prefix="rr_"), **_m(30.0 + seed, prefix="xd_dukemtmcreid_"),
             **_m(33.0 + seed, prefix="xd_dukemtmcreid_rr_"), **_m(71.0 + seed, prefix="bnr_")}
        add(TrialSpec("baseline", 0, seed=seed), m)
        add(TrialSpec("lsro", 360, seed=seed), {k: v + 2 for k, v in m.items()})
    add(TrialSpec("lsro", 360, seed=2), {}, stopped_after=3)  # ASHA: no test metrics
    rows = collect(client, exp_id, parent)
    labels = ["as trained", "re-ranked", "BN re-estimated", "cross-domain dukemtmcreid",
              "cross-domain dukemtmcreid, re-ranked"]
    assert list(dict.fromkeys(r.evaluation for r in rows)) == labels
    xd = [r for r in rows if r.evaluation == "cross-domain dukemtmcreid" and r.method == "baseline"]
    assert sorted(r.rank1 for r in xd) == [30.0, 31.0]
    stopped = [r for r in rows if r.stopped_after is not None]
    assert sorted(r.evaluation for r in stopped) == sorted(labels)  # listed in every evaluation, no verdict in any
    groups = summarise(rows)
    lsro = {g.evaluation: g for g in groups if g.method != "baseline"}
    assert set(lsro) == set(labels) and all(g.vs["baseline"] is None and g.stopped == {2: 3} for g in lsro.values())


def test_group_tags_are_the_reports_groups_and_the_report_adds_them(store):
    client, exp_id, parent, uri, add = store
    ids = {(m, s): add(TrialSpec(m, n, seed=s), _m(70.0 + s + (m != "baseline")))
           for m, n in (("baseline", 0), ("lsro", 360)) for s in (0, 1)}
    assert all(TAG_SETTING not in client.get_run(i).data.tags for i in ids.values())  # as an older sweep left them
    stale = ids[("lsro", 1)]
    client.set_tag(stale, TAG_SETTING, "00000000")
    build(client, exp_id, parent)
    runs = {r.info.run_id: r for r in trial_runs(client, exp_id, parent)}
    rows = collect(client, exp_id, parent)
    for (m, s), rid in ids.items():
        tags, params = runs[rid].data.tags, runs[rid].data.params
        assert tags[TAG_SETTING] == setting_of(params) == next(r.setting for r in rows if (r.method, r.seed) == (m, s))
        assert tags[TAG_GROUP] == group_tags(params)[TAG_GROUP]
    # what tuning passes at a trial's start (the config's values, not yet strings) gives the same tags
    spec = TrialSpec("lsro", 360, seed=1)
    raw = {**flat_dict(replace(load_config("smoke"), **spec.overrides())), "trial": spec.key}
    assert group_tags(raw) == {k: runs[stale].data.tags[k] for k in (TAG_SETTING, TAG_GROUP)}
    from orchestrator.groups import MAX_PARAM

    assert MAX_PARAM == tracking.MAX_PARAM  # the tags hash the params as log_params stores them
    by_group = {}
    for (m, s), rid in ids.items():
        by_group.setdefault(runs[rid].data.tags[TAG_GROUP], set()).add(m)
    assert sorted(by_group.values(), key=sorted) == [{"baseline"}, {"lsro"}]  # MLflow's group-by: the report's
    assert next(iter(by_group)).startswith("baseline pool=- gan=0 order=paper keep=None setting=")


def test_group_statistics_and_tables_on_the_sweeps_run(store):
    client, exp_id, parent, uri, add = store
    for s, (b, lsro) in enumerate(((70.0, 72.0), (71.0, 73.5), (69.0, 71.0))):
        add(TrialSpec("baseline", 0, seed=s), {**_m(b), **_m(b + 5, prefix="rr_")})
        add(TrialSpec("lsro", 360, seed=s), {**_m(lsro), **_m(lsro + 4, prefix="rr_")})
    text = sweep_statistics(uri, "mprl", Path(client.tracking_uri[len("sqlite:///"):]).parent, parent)
    groups = summarise(collect(client, exp_id, parent))
    metrics = client.get_run(parent).data.metrics
    lsro = next(g for g in groups if g.method == "lsro" and g.evaluation == "as trained")
    at = group_prefix(lsro)
    assert at == f"{lsro.setting}/lsro/gan/360"
    d = lsro.vs["baseline"]["rank1"]
    assert metrics[f"{at}.rank1_mean"] == pytest.approx(lsro.rank1.mean)
    assert metrics[f"{at}.rank1_ci95"] == pytest.approx(lsro.rank1.ci) and metrics[f"{at}.n"] == 3
    assert metrics[f"{at}.drank1_vs_baseline"] == pytest.approx(d.mean)
    assert metrics[f"{at}.drank1_vs_baseline_p_holm"] == pytest.approx(d.p_adj)
    rr = next(g for g in groups if g.method == "lsro" and g.evaluation == "re-ranked")
    assert metrics[f"{group_prefix(rr)}.rank1_mean"] == pytest.approx(rr.rank1.mean) and group_prefix(rr) == at + "/rr"
    assert metrics["report.family_rank1"] == 2 and f"{at}.drank1_vs_unlabelled" not in metrics  # none swept
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.txt", f"report/setting-{lsro.setting}.csv", f"report/setting-{lsro.setting}-rr.csv",
            "report/domains.csv"} <= arts
    local = client.download_artifacts(parent, f"report/setting-{lsro.setting}.csv")
    rows = list(csv.DictReader(open(local)))
    assert float(next(r for r in rows if r["method"] == "lsro")["Δr1 vs baseline"]) == pytest.approx(d.mean)
    assert "setting " in text and "domains:" in text


def test_the_cli_prints_csv_and_writes_one_file_per_table(store, tmp_path, capsys):
    client, exp_id, parent, uri, add = store
    for s in range(2):
        add(TrialSpec("baseline", 0, seed=s), _m(70.0 + s))
        add(TrialSpec("lsro", 360, seed=s), _m(71.5 + 2 * s))
    out = tmp_path / "out"
    assert main(["--storage", str(tmp_path), "--format", "csv", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    name, body = printed.split("\n", 1)
    assert name.startswith("# setting-")
    rows = list(csv.DictReader(io.StringIO(body.split("\n\n")[0])))
    assert [r["method"] for r in rows] == ["baseline", "lsro"] and rows[1]["rank-1 mean"] == "72.5"
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "report.txt", f"{name[2:]}.csv"]
    assert main(["--storage", str(tmp_path), "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and "% multiplicity:" in tex
    assert main(["--storage", str(tmp_path), "--experiment", "other"]) == 2  # a read: no experiment created
    assert "--experiment 'other': no such experiment" in capsys.readouterr().err
    assert client.get_experiment_by_name("other") is None


def test_a_missing_store_is_one_line_and_nothing_is_created(tmp_path, capsys):
    missing = tmp_path / "no-such-runs"
    assert main(["--storage", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--storage {missing}: no such folder" in err
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--storage", str(empty)]) == 2
    assert f"no MLflow store at {empty / 'mlflow.db'}" in capsys.readouterr().err
    assert list(empty.iterdir()) == []  # no empty mlflow.db made by the read


def test_an_unreachable_tracking_server_fails_in_seconds_naming_it(capsys):
    with socket.socket() as s:  # a free port nothing listens on: refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    assert main(["--tracking-uri", uri]) == 2
    assert time.monotonic() - start < 5 and f"MLflow tracking server {uri} is not reachable" in capsys.readouterr().err
    silent = socket.socket()  # accepts connections, never answers (the case that hung)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        assert main(["--tracking-uri", uri]) == 2
        assert time.monotonic() - start < 10 and uri in capsys.readouterr().err
    finally:
        silent.close()


def test_help_is_fast_and_says_every_default():
    code = ("import sys, time; t = time.perf_counter()\nfrom orchestrator.report import main\ntry:\n main(['--help'])\n"
            "except SystemExit:\n pass\nprint(sorted(m for m in ('mlflow', 'ray', 'torch', 'scipy', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().endswith("[]")  # nothing heavy imported before the arguments are parsed
    for option in ("--experiment", "--storage", "--tracking-uri", "--sweep", "--format", "--out"):
        assert option in out
    assert out.count("(default:") == 6
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.report", "--help"], capture_output=True, cwd=ROOT, check=True)
    assert time.perf_counter() - start < 1.5
