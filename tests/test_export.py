"""``python -m orchestrator.export`` (orchestrator/export.py): a finished trial's final-model features, found through
the tags its MLflow run carries, equal the final evaluation's; npz and parquet; clear errors before any Ray."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import export, tracking
from orchestrator.trials import TAG_DATA_ROOT, TAG_RUN_DIR, TAG_TEST_ROOTS


@pytest.fixture(scope="module")
def trial(tmp_path_factory, tiny_root):
    """A one-epoch trial on the tiny dataset, finished (tuning._finish) into a real MLflow store, tested on a second
    synthetic dataset too: (client, run id, storage folder, config, that dataset's root)."""
    from datasets.synthetic import generate
    from orchestrator import tuning
    from orchestrator.config import load_config
    from orchestrator.trials import TrialContext, TrialSpec
    from trainables.config import ReidInputs
    from trainables.reid.loop import run_spec, train_reid

    base = tmp_path_factory.mktemp("export")
    other = base / "Other-Set"
    generate(other, ids=6, images_per_id=6, distractors=5, junk=4, size=(64, 32), seed=5, workers=1)
    cfg = load_config("smoke", overrides=["reid.image_size=[32, 16]", "reid.batch_size=16", "reid.embed_dim=32",
                                          "reid.loader_workers=0", "reid.num_workers=0", "reid.epochs=1",
                                          "labels.method=baseline", f"cluster.storage_path={base}",
                                          f"dataset.test_root=[{other}]"])
    spec = TrialSpec("baseline", 0)
    inputs = ReidInputs(str(tiny_root), test_roots=(str(other),))
    result = train_reid(cfg.reid, cfg.labels, inputs, run_spec(cfg.reid, base / "trials", spec.key, num_workers=0))
    client, exp_id = tracking.setup(tracking.default_tracking_uri(base), "mprl", base)
    run_id, _ = tracking.get_or_create_run(client, exp_id, "trial", f"sw/{spec.key}", spec.key)
    tracking.log_params(client, run_id, {"reid.use_gpu": cfg.reid.use_gpu})
    ctx = TrialContext(cfg, "sw", inputs, str(base / "trials"), {}, log_models=False)
    tuning._finish(client, run_id, cfg, spec, result, ctx, time.perf_counter())
    return client, run_id, base, cfg, other


def _direct(run_dir: str, root: Path):
    """The final model's embeddings of ``root``'s split, computed here as the final evaluation does."""
    from datasets.market1501 import load_test
    from trainables.config import ReidConfig, build
    from trainables.reid.evaluate import embed_split
    from trainables.reid.loop import load_trained

    model, state = load_trained(run_dir)
    return embed_split(model, load_test(root), build(ReidConfig, state["reid"], "reid."), torch.device("cpu"))


def test_the_run_names_its_model_and_data(trial, tiny_root):
    client, run_id, base, _, other = trial
    src = export.find_source(client, run_id)
    assert (src.root, src.split, src.use_gpu) == (str(tiny_root), "test", False)
    assert src.run_dir == client.get_run(run_id).data.tags[TAG_RUN_DIR]
    assert export.find_source(client, run_id, "otherset").root == str(other)


def test_a_trial_is_named_by_its_run_id_or_its_name(trial):
    client, run_id, _, _, _ = trial
    name = client.get_run(run_id).info.run_name  # baseline-n0-paper-kall-s0
    assert export.resolve_run(client, name) == run_id == export.resolve_run(client, run_id)
    with pytest.raises(ValueError, match="'lsro-n9-paper-kall-s0' is neither a run id nor a trial"):
        export.resolve_run(client, "lsro-n9-paper-kall-s0")


def test_bad_runs_and_splits_are_refused_before_any_ray(trial, tmp_path):
    client, run_id, base, _, _ = trial
    with pytest.raises(ValueError, match="no MLflow run 'f00' at sqlite"):
        export.find_source(client, "f00")
    exp_id = client.get_run(run_id).info.experiment_id
    bare, _ = tracking.get_or_create_run(client, exp_id, "trial", "sw/other", "other")
    with pytest.raises(ValueError, match=f"run {bare} has no model to export: no {TAG_RUN_DIR} tag"):
        export.find_source(client, bare)
    client.set_tag(bare, TAG_RUN_DIR, str(tmp_path))  # a folder without a checkpoint
    with pytest.raises(ValueError, match=f"run {bare} has no model to export: no checkpoint in its run folder"):
        export.find_source(client, bare)
    with pytest.raises(ValueError, match="--split 'duke': run .* was tested on 'test' \\(its dataset\\), 'otherset' "
                                         "only"):
        export.find_source(client, run_id, "duke")
    gone, _ = tracking.get_or_create_run(client, exp_id, "trial", "sw/gone", "gone")
    tags = client.get_run(run_id).data.tags
    for tag in (TAG_RUN_DIR, TAG_TEST_ROOTS):
        client.set_tag(gone, tag, tags[tag])
    client.set_tag(gone, TAG_DATA_ROOT, str(tmp_path / "moved"))
    with pytest.raises(ValueError, match="the test images of run .* are gone: .*moved' is not a folder"):
        export.find_source(client, gone)
    with pytest.raises(ValueError, match="--out x.csv: the file name must end in .npz or .parquet"):
        export.export(client, run_id, Path("x.csv"))
    with pytest.raises(ValueError, match=f"no MLflow store at {tmp_path / 'mlflow.db'}"):
        export.open_client(None, str(tmp_path))
    assert not (tmp_path / "mlflow.db").exists()  # a read creates no store


def test_the_features_are_the_final_evaluations_in_npz_and_parquet(trial, tmp_path):
    import pyarrow.parquet as pq

    client, run_id, _, _, other = trial
    src = export.find_source(client, run_id, "otherset")
    features = export.extract(src.run_dir, src.root, False)  # the Ray task's body, here in-process
    emb = _direct(src.run_dir, other)
    np.testing.assert_allclose(features["query_features"], emb.qf.numpy(), atol=1e-6)
    np.testing.assert_allclose(features["gallery_features"], emb.gf.numpy(), atol=1e-6)
    assert features["query_features"].dtype == np.float32
    np.testing.assert_array_equal(features["gallery_pids"], emb.g_pids)
    np.testing.assert_array_equal(features["query_camids"], emb.q_camids)
    assert Path(features["query_paths"][0]).parent == other / "query"

    npz = np.load(export.write(features, tmp_path / "f.npz"))
    assert sorted(npz.files) == sorted(features) and all(np.array_equal(npz[k], v) for k, v in features.items())
    table = pq.read_table(export.write(features, tmp_path / "f.parquet"))
    n_q, dim = features["query_features"].shape
    assert table.num_rows == n_q + len(features["gallery_pids"])
    assert str(table.schema.field("feature").type) == f"fixed_size_list<element: float>[{dim}]"
    rows = table.to_pydict()
    assert rows["side"][n_q] == "gallery" and rows["path"][n_q] == features["gallery_paths"][0]
    np.testing.assert_array_equal(np.array(rows["feature"][n_q], dtype=np.float32), features["gallery_features"][0])
    assert rows["pid"][:n_q] == features["query_pids"].tolist()


@pytest.mark.slow
@pytest.mark.ray
def test_the_command_extracts_in_a_ray_task(trial, tmp_path, local_ray, capsys):
    client, run_id, base, _, _ = trial
    out = tmp_path / "feats.npz"
    assert export.main([run_id, "--storage", str(base), "--out", str(out)]) == 0
    assert f"wrote {out}: " in capsys.readouterr().out
    src = export.find_source(client, run_id)
    emb = _direct(src.run_dir, Path(src.root))
    got = np.load(out)
    np.testing.assert_allclose(got["query_features"], emb.qf.numpy(), atol=1e-6)
    np.testing.assert_allclose(got["gallery_features"], emb.gf.numpy(), atol=1e-6)
    assert export.main(["nope", "--storage", str(base)]) == 2
    assert "error: 'nope' is neither a run id nor a trial" in capsys.readouterr().err
    assert export.main(["0" * 32, "--storage", str(base)]) == 2  # a run id that is not there
    assert f"error: no MLflow run '{'0' * 32}'" in capsys.readouterr().err
