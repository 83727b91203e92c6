"""A single ``orchestrator.train`` run in MLflow: one run tagged ``mprl.kind=single`` in the sweep's store, the
config as params, the final metrics in percent, the CMC plot (reid) or the sample grid (gan); a failure ends the
run FAILED with its reason."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator import tracking
from orchestrator.train import KIND, main

SMOKE_REID = ["reid", "--preset", "smoke", "--label-method", "baseline", "--num-gan", "0", "--set", "reid.epochs=1",
              "--set", "reid.pretrained=random"]


def _runs(storage: Path):
    client, exp_id = tracking.setup(tracking.default_tracking_uri(storage), "mprl", storage)
    return client, client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = '{KIND}'")


def test_a_reid_run_logs_its_params_percent_metrics_and_cmc_plot(tmp_path, capsys):
    argv = [*SMOKE_REID, "--out", str(tmp_path / "out"), "--set", f"cluster.storage_path={tmp_path}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    printed = dict(re.findall(r"(rank-1|mAP) (\d+\.\d{2})", out))
    client, runs = _runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "reid-baseline-0"
    assert run.data.tags[tracking.TAG_UNIT] == tracking.PERCENT and run.data.tags["mprl.stage"] == "reid"
    assert run.data.params["reid.epochs"] == "1" and run.data.params["labels.method"] == "baseline"
    metrics = run.data.metrics
    assert abs(metrics["final_rank1"] - float(printed["rank-1"])) < 0.006  # percent, as the CLI prints it
    assert abs(metrics["final_mAP"] - float(printed["mAP"])) < 0.006
    assert 0 <= metrics["final_mINP"] <= 100 and metrics["num_classes"] == 12
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/cmc.png",
                                                                               "plots/ranked_list.png"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")] == ["evaluation/per_query_ap.npy"]
    assert run.data.tags["mprl.run_dir"].endswith("reid-baseline-0")  # what orchestrator.export reads
    assert f"run {run.info.run_id}" in out and str(tmp_path / "mlflow.db") in out

    # the same name again resumes the run folder, and its MLflow run: still one run
    assert main(argv) == 0
    _, again = _runs(tmp_path)
    assert [r.info.run_id for r in again] == [run.info.run_id] and again[0].info.status == "FINISHED"


def test_a_failed_run_ends_failed_with_its_reason(tmp_path, capsys):
    missing = tmp_path / "no-store"
    argv = ["reid", "--preset", "smoke", "--label-method", "lsro", "--num-gan", "8", "--gan-store", str(missing),
            "--out", str(tmp_path / "out"), "--set", f"cluster.storage_path={tmp_path}"]
    assert main(argv) == 2
    assert str(missing) in capsys.readouterr().err
    _, runs = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"] and str(missing) in runs[0].data.tags[tracking.TAG_ERROR]


def test_a_gan_run_logs_its_sample_grid(tmp_path):
    argv = ["gan", "--preset", "smoke", "--out", str(tmp_path / "out"), "--set", "gan.epochs=1", "--set",
            "dataset.synthetic_ids=4", "--num-images", "12", "--set", f"cluster.storage_path={tmp_path}",
            "--tracking-uri", tracking.default_tracking_uri(tmp_path / "elsewhere")]
    (tmp_path / "elsewhere").mkdir()
    assert main(argv) == 0
    client, runs = _runs(tmp_path / "elsewhere")  # --tracking-uri wins over the storage path's store
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["mprl.stage"] == "gan"
    assert runs[0].data.metrics["generated_images"] == 12 and runs[0].data.params["generate.num_images"] == "12"
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "samples")] == ["samples/samples.png"]
