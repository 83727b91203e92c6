"""Cross-dataset evaluation (``dataset.test_root``): a model trained on one synthetic dataset is also tested on
another one's query/gallery (metrics ``xd_<name>_*``, re-ranked ``xd_<name>_rr_*``); bad test roots fail before any
cluster time, naming the field and the path; the keys of the stages that do not evaluate ignore the test sets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from datasets.market1501 import load_test
from orchestrator import stages, tracking
from orchestrator.config import load_config
from trainables.config import (
    FINAL_METRICS,
    DatasetConfig,
    ReidInputs,
    cross_domain_name,
    metric_names,
    metric_prefix,
)


@pytest.fixture(scope="module")
def other_root(tmp_path_factory, tiny_params) -> Path:
    """A second tiny synthetic dataset: other people (another seed), its folder named like a real one."""
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("other") / "Other-Set_B"
    generate(root, workers=1, **{**tiny_params, "seed": 11})
    return root


def test_names_come_from_the_folder_and_must_differ():
    assert cross_domain_name("/data/DukeMTMC-reID/") == "dukemtmcreid"
    assert cross_domain_name("cuhk03-np") == "cuhk03np"
    assert DatasetConfig(test_root="/d/Market-1501").test_root == ("/d/Market-1501",)  # one path: a tuple of one
    assert DatasetConfig().test_root == ()
    with pytest.raises(ValueError, match="dataset.test_root: /a/Duke-x and /b/dukex have the same test-set name "
                                         "'dukex'"):
        DatasetConfig(test_root=["/a/Duke-x", "/b/dukex"])
    with pytest.raises(ValueError, match="dataset.test_root='/a/__': the folder's name has no letter or digit"):
        DatasetConfig(test_root=["/a/__"])
    with pytest.raises(ValueError, match="dataset.test_root='': the folder's name has no letter or digit"):
        DatasetConfig(test_root=[""])  # not the current folder
    assert metric_prefix("dukemtmcreid") == "xd_dukemtmcreid_" and metric_prefix(reranked=True) == "rr_"
    assert metric_prefix("dukemtmcreid", reranked=True) == "xd_dukemtmcreid_rr_"
    assert metric_names("xd_dukemtmcreid_rr_")[0] == "final_xd_dukemtmcreid_rr_rank1"
    for prefix in ("", "bnr_", "rr_", "xd_dukemtmcreid_", "xd_dukemtmcreid_rr_"):  # MLflow keeps them in percent
        assert all(tracking.is_ranking_metric(name) for name in metric_names(prefix)), prefix


def test_a_list_of_test_roots_comes_from_the_command_line(other_root, tiny_root, monkeypatch):
    cfg = load_config("smoke", overrides=[f"dataset.test_root=[{other_root}, {tiny_root}]"])
    assert cfg.dataset.test_root == (str(other_root), str(tiny_root))
    assert load_config("smoke", overrides=[f"dataset.test_root={other_root}"]).dataset.test_root == (str(other_root),)
    monkeypatch.chdir(other_root.parent)  # a relative path is made absolute where the config is built (the driver)
    assert load_config("smoke", overrides=[f"dataset.test_root=[{other_root.name}]"]).dataset.test_root == (
        str(other_root),)


def test_bad_test_roots_fail_before_any_cluster_time(tmp_path, other_root):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"^dataset.test_root={missing} is not a folder"):
        stages.check_dataset(DatasetConfig(test_root=(str(other_root), str(missing))))
    empty = tmp_path / "Empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"^dataset.test_root={empty}: split folder not found: {empty}/query"):
        stages.check_dataset(DatasetConfig(test_root=str(empty)))
    stages.check_dataset(DatasetConfig(test_root=str(other_root)))  # a good one passes


def test_a_pure_test_set_needs_no_training_folder(tmp_path, other_root):
    import shutil

    root = tmp_path / "QueryGalleryOnly"
    for part in ("query", "bounding_box_test"):
        shutil.copytree(other_root / part, root / part)
    split = load_test(root)
    assert split.train == () and len(split.query) == len(load_test(other_root).query)


def test_the_stages_that_do_not_evaluate_ignore_the_test_sets(tmp_path, other_root):
    from orchestrator.stage_cache import Paths

    plain = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}"])
    tested = dataclasses.replace(plain, dataset=dataclasses.replace(plain.dataset, test_root=(str(other_root),)))
    paths = Paths(tmp_path)
    same = lambda f: f(plain) == f(tested)  # noqa: E731
    assert stages.dataset_path(plain.dataset, paths.datasets) == stages.dataset_path(tested.dataset, paths.datasets)
    assert same(lambda c: stages.dataset_node(c, paths, {}).key) and same(stages.gan_key)
    assert not same(stages.baseline_key)  # the baseline reports the test sets' metrics: a new baseline


def test_a_run_is_tested_on_the_other_dataset_too(tmp_path, tiny_root, other_root, tiny_cfg):
    from datasets.decoded_cache import decoded_rows
    from trainables.config import cache_size
    from trainables.reid.evaluate import evaluate_model
    from trainables.reid.loop import load_trained, run_spec, train_reid

    cfg = tiny_cfg("reid.epochs=1", "labels.method=baseline", "reid.rerank=true")
    run = run_spec(cfg.reid, tmp_path / "runs", "r", num_workers=0)
    res = train_reid(cfg.reid, cfg.labels, ReidInputs(str(tiny_root), test_roots=(str(other_root),)), run)
    name = cross_domain_name(str(other_root))
    assert name == "othersetb" and set(res.cross_domain) == {name}
    found = res.cross_domain[name]
    assert set(found) == {*FINAL_METRICS, *(f"rr_{m}" for m in FINAL_METRICS)}
    assert all(0.0 <= v <= 1.0 for v in found.values())
    model, _ = load_trained(run.run_dir)  # the final model, evaluated on the other split directly
    direct = evaluate_model(model, load_test(other_root), cfg.reid, torch.device("cpu"))
    assert {m: found[m] for m in FINAL_METRICS} == pytest.approx({m: direct[m] for m in FINAL_METRICS}, abs=1e-6)
    own = evaluate_model(model, load_test(tiny_root), cfg.reid, torch.device("cpu"))
    assert res.rank1 == pytest.approx(own["rank1"]) and found["mAP"] != pytest.approx(own["mAP"])  # another split
    metrics = res.metrics()
    assert metrics[f"xd_{name}_rank1"] == found["rank1"] and metrics[f"xd_{name}_rr_mAP"] == found["rr_mAP"]
    assert set(res.reranked) == set(FINAL_METRICS) and metrics["rr_rank1"] == res.reranked["rank1"]
    # the other set's images were decoded into the run's cache (each row checked against its file)
    other = load_test(other_root)
    size = cache_size(cfg.reid.image_size, cfg.reid.augment)
    assert len(decoded_rows(other.gallery, size, tmp_path / "runs" / "decoded", build=False)) == len(other.gallery)


def test_rerank_on_a_test_set_too_small_fails_before_training(tmp_path, tiny_root, tiny_cfg):
    from datasets.synthetic import generate
    from trainables.reid.loop import run_spec, train_reid

    small = tmp_path / "Small"
    generate(small, ids=2, images_per_id=2, distractors=0, junk=0, size=(64, 32), seed=1, workers=1)
    cfg = tiny_cfg("reid.epochs=1", "labels.method=baseline", "reid.rerank=true")
    with pytest.raises(ValueError, match="needs more than 20 query \\+ gallery images; the small test split has"):
        train_reid(cfg.reid, cfg.labels, ReidInputs(str(tiny_root), test_roots=(str(small),)),
                   run_spec(cfg.reid, tmp_path / "runs", "r", num_workers=0))
    assert not (tmp_path / "runs" / "r").exists() or not any((tmp_path / "runs" / "r").rglob("state.pt"))
