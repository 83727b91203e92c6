"""The controls and the paper's claims end to end (slow: a few minutes on 2 cores): the unlabelled control and BN
re-estimation in a 3-seed sweep whose report prints dMpRL-II vs LSRO with a Holm-adjusted p; LSRO on the
synthetic_ids pool; a folder pool made in the test, and a folder with a corrupt image named in the error."""

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.generated import GeneratedStore
from orchestrator import tracking
from tests.test_sweep import _learned, _runs, _smoke

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_controls_bn_re_estimation_and_the_papers_claims_in_the_report(tmp_path, local_ray):
    from orchestrator import report
    from orchestrator.sweep import run_sweep

    out = run_sweep(_smoke(tmp_path, "sweep.methods=[baseline, lsro, dmprl2, unlabelled]", "sweep.seeds=[0, 1, 2]",
                           "reid.bn_recalibrate=true", "reid.epochs=5", "gan.epochs=1", "labels.switch_at=0"),
                    log_models=False)
    assert len(out.rows) == 12 and all(r.error is None for r in out.rows)
    client, exp_id = tracking.setup(out.tracking_uri, "mprl", tmp_path)
    trials = _runs(client, exp_id, "trial")
    missing = [t.info.run_name for t in trials
               if not {"final_rank1", "final_bnr_rank1", "final_bnr_mAP"} <= set(t.data.metrics)]
    assert not missing, missing
    flat = [t.info.run_name for t in trials if t.data.params["labels.method"] != "baseline"
            and not _learned(client, t.info.run_id)]
    assert not flat, [(n, [m.value for m in sorted(client.get_metric_history(
        next(t.info.run_id for t in trials if t.info.run_name == n), "loss"), key=lambda m: m.step)]) for n in flat]
    # the baseline stage's MLflow run carries both evaluations too
    base = next(r for r in _runs(client, exp_id, "stage") if r.info.run_name == "stage:baseline")
    assert {"rank1", "bnr_rank1"} <= set(base.data.metrics)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert report.main(["--storage", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    text = printed.getvalue()
    rows = [ln for ln in text.splitlines() if ln.startswith("dmprl2 vs lsro")]
    assert len(rows) == 2  # as trained, and with BN re-estimated
    family = int(text.split("a family of ")[1].split(" rank-1")[0])
    assert family == 2 * (3 + 2 + 1)  # x2 evaluations: 3 methods vs baseline, 2 vs unlabelled, dmprl2 vs lsro
    for line in rows:
        cells = line.split()
        # "dmprl2 vs lsro  64  3  +1.26 [±15.07] p=0.75  1.00  ...": the paired n, then p Holm >= the raw p
        assert cells[4] == "3" and float(cells[8]) >= float(cells[7].removeprefix("p="))
    assert "Δr1 vs unlabelled" in text and "re-estimated on the real training images" in text
    assert (tmp_path / "report" / "comparison.png").is_file()


def test_lsro_on_the_synthetic_ids_pool_trains_no_gan(tmp_path, local_ray):
    from orchestrator.sweep import run_sweep

    out = run_sweep(_smoke(tmp_path, "labels.pool=synthetic_ids", "sweep.methods=[lsro]", "reid.epochs=3"),
                    log_models=False)
    assert [r.error for r in out.rows] == [None] and out.stages.gan is None
    store = GeneratedStore(out.stages.generate.out.store)
    assert store.info["meta"]["pool"] == "synthetic_ids" and store.n == 64 and store.image_size == (32, 16)
    client, exp_id = tracking.setup(out.tracking_uri, "mprl", tmp_path)
    (trial,) = _runs(client, exp_id, "trial")
    assert _learned(client, trial.info.run_id) and trial.data.params["labels.pool"] == "synthetic_ids"
    assert out.stages.pool_quality is not None and "synthetic_ids" in out.stages.pool_quality.out.rendering


def _folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):  # nested folders, two formats, sizes unlike the pool's
        sub = root / f"cam{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (40 + i % 5, 20, 3), dtype=np.uint8))
        img.save(sub / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_a_folder_pool_trains_and_a_corrupt_image_is_named(tmp_path, local_ray):
    from orchestrator.sweep import run_sweep

    folder = _folder(tmp_path / "other_generator", 64)
    out = run_sweep(_smoke(tmp_path / "ok", "labels.pool=folder", f"labels.pool_root={folder}",
                           "sweep.methods=[baseline, lsro]", "reid.epochs=3"), log_models=False)
    assert all(r.error is None for r in out.rows)
    store = GeneratedStore(out.stages.generate.out.store)
    assert store.info["meta"]["pool"] == "folder" and store.n == 64
    client, exp_id = tracking.setup(out.tracking_uri, "mprl", tmp_path / "ok")
    lsro = next(t for t in _runs(client, exp_id, "trial") if t.data.params["labels.method"] == "lsro")
    assert _learned(client, lsro.info.run_id)

    (folder / "cam1" / "zz_broken.jpg").write_bytes(b"not a jpeg at all")  # sorted last among 65 files
    with pytest.raises(ValueError, match="fewer than the 66"):  # too few: refused before any cluster time
        run_sweep(_smoke(tmp_path / "bad", "labels.pool=folder", f"labels.pool_root={folder}",
                         "sweep.methods=[lsro]", "sweep.num_gan=[66]"))
    bad = run_sweep(_smoke(tmp_path / "bad", "labels.pool=folder", f"labels.pool_root={folder}",
                           "sweep.methods=[lsro]", "sweep.num_gan=[65]"), log_models=False)
    (row,) = bad.rows
    assert row.error and "zz_broken.jpg" in row.error  # the trial fails with the pool stage's message
    assert not any((tmp_path / "bad" / "stages").glob("pool-*/done.json"))  # no half-written pool taken as done


def test_the_diagnosis_preset_runs_at_smoke_size(tmp_path, local_ray):
    """--preset cpu-diagnosis (README), shrunk to the smoke preset's sizes, one seed: every control runs and learns,
    and each model is evaluated both ways."""
    from orchestrator.config import PRESET_OVERRIDES, load_config
    from orchestrator.sweep import run_sweep

    smoke = PRESET_OVERRIDES["smoke"]
    shrink = [f"{section}.{k}={v}" for section in ("dataset", "gan", "reid") for k, v in smoke[section].items()]
    cfg = load_config("cpu-diagnosis", overrides=[f"cluster.storage_path={tmp_path}", "cluster.num_cpus=3", *shrink,
                                                  "labels.num_gan=64", "sweep.num_gan=[64]", "sweep.seeds=[0]",
                                                  "reid.epochs=3", "reid.optimizer=sgd", "reid.warmup_epochs=0",
                                                  "labels.switch_at=0"])
    assert cfg.dataset.synthetic_seed == 1 and cfg.reid.bn_recalibrate and cfg.sweep.pools == ("synthetic_ids",)
    out = run_sweep(cfg, log_models=False)
    assert sorted(r.key for r in out.rows) == sorted([
        "baseline-n0-paper-kall-s0", "lsro-n64-paper-kall-s0", "dmprl2-n64-paper-kall-s0",
        "unlabelled-n64-paper-kall-s0", "baseline_matched-n64-paper-kall-s0",
        "lsro-n64-paper-kall-s0-psynthetic_ids"])
    assert all(r.error is None for r in out.rows)
    client, exp_id = tracking.setup(out.tracking_uri, "mprl", tmp_path)
    for t in _runs(client, exp_id, "trial"):
        assert "final_bnr_rank1" in t.data.metrics
        if t.data.params["labels.method"] != "baseline":
            assert _learned(client, t.info.run_id), t.info.run_name
