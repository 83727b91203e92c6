"""The researcher's daily tools end to end, as the README shows them (slow: a smoke sweep on 2 cores): a sweep
tested on a second dataset and re-ranked, its report in csv with the domains table, the ranked list and per-query
AP on each trial's run, the registry, and the features exported from a trial's run."""

import contextlib
import io

import numpy as np
import pytest

from orchestrator import tracking
from tests.test_sweep import _learned, _runs, _smoke

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_cross_domain_reranked_sweep_report_ranked_list_registry_and_export(tmp_path, local_ray):
    from datasets.synthetic import generate
    from orchestrator import export, report
    from orchestrator.sweep import run_sweep

    other = tmp_path / "data" / "Synthetic-B"
    generate(other, ids=12, images_per_id=8, distractors=12, junk=8, size=(64, 32), seed=7, workers=1)
    out = run_sweep(_smoke(tmp_path / "runs", "sweep.methods=[baseline, lsro]", f"dataset.test_root={other}",
                           "reid.rerank=true", "reid.epochs=5"))
    assert all(r.error is None for r in out.rows), [r.error for r in out.rows]
    client, exp_id = tracking.setup(out.tracking_uri, "mprl", tmp_path / "runs")
    trials = _runs(client, exp_id, "trial")
    assert len(trials) == 2
    for t in trials:
        m = tracking.fractions(t)
        for prefix in ("", "rr_", "xd_syntheticb_", "xd_syntheticb_rr_"):
            assert 0.0 <= m[f"final_{prefix}rank1"] <= 1.0 and f"final_{prefix}mAP" in m, (prefix, sorted(m))
        assert {a.path for a in client.list_artifacts(t.info.run_id, "plots")} >= {"plots/cmc.png",
                                                                                    "plots/ranked_list.png"}
        assert [a.path for a in client.list_artifacts(t.info.run_id, "evaluation")] == ["evaluation/per_query_ap.npy"]
    lsro = next(t for t in trials if t.data.params["labels.method"] == "lsro")
    assert _learned(client, lsro.info.run_id)
    assert {m.name for m in client.search_registered_models()} == {"mprl-mprl-baseline", "mprl-mprl-lsro"}

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = report.main(["--storage", str(tmp_path / "runs"), "--format", "csv", "--out", str(tmp_path / "csv")])
    assert code == 0
    domains = (tmp_path / "csv" / "domains.csv").read_text()
    assert "syntheticb" in domains and "re-ranked" in domains
    parent = client.get_run(out.parent_run_id)
    assert any(k.endswith(".rank1_mean") for k in parent.data.metrics)  # the report's groups on the sweep's run

    npz = tmp_path / "lsro-b.npz"
    assert export.main([lsro.info.run_id, "--storage", str(tmp_path / "runs"), "--split", "syntheticb",
                        "--out", str(npz)]) == 0
    got = np.load(npz)
    assert got["query_features"].dtype == np.float32 and got["query_features"].shape[0] == len(got["query_pids"])
    assert len(got["gallery_paths"]) == len(got["gallery_pids"]) > 0
    assert all(str(other) in p for p in got["query_paths"])
