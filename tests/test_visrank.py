"""The ranked-list picture (trainables/evaluation/visrank.py): each query's top-k in distance order under the Market
protocol, true matches framed green and false ones red; the final evaluation writes it and the per-query AP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.config import PER_QUERY_AP, RANKED_LIST, ReidConfig
from trainables.evaluation.visrank import BORDER, GAP, GREEN, QUERY_FRAME, RED, chosen_queries, ranked_list, top_matches

H, W = 12, 6


def _cell_frame(picture: Image.Image, row: int, col: int) -> tuple[tuple, tuple]:
    """(frame colour, centre colour) of cell ``col`` (0: the query, 1..: rank col) of query row ``row``."""
    cell_h, cell_w = H + 2 * BORDER, W + 2 * BORDER
    top = GAP + row * (cell_h + GAP)
    left = 0 if col == 0 else cell_w + 4 * GAP + (col - 1) * (cell_w + GAP)
    return picture.getpixel((left + 1, top + 1)), picture.getpixel((left + cell_w // 2, top + cell_h // 2))


def test_top_matches_follow_the_market_protocol():
    g_pids = np.array([5, 5, 7, -1, 5, 0, 7])
    g_cams = np.array([0, 1, 1, 1, 1, 2, 0])
    dist = np.array([0.0, 0.5, 0.3, 0.1, 0.5, 0.2, 0.9])
    idx, hits = top_matches(dist, 5, 0, g_pids, g_cams, k=4)
    # 0 (pid 5, camera 0: the query's own camera) and 3 (junk) are removed; 1 and 4 tie: the lower index first
    assert idx.tolist() == [5, 2, 1, 4] and hits.tolist() == [False, False, True, True]
    assert top_matches(dist, 5, 0, g_pids, g_cams, k=10)[0].tolist() == [5, 2, 1, 4, 6]


def test_the_picture_frames_true_matches_green_and_false_ones_red():
    # gallery image i is a solid grey of value 10 * (i + 1); queries are solid blue
    gallery = np.stack([np.full((H, W, 3), 10 * (i + 1), dtype=np.uint8) for i in range(6)])
    queries = np.zeros((2, H, W, 3), dtype=np.uint8)
    queries[..., 2] = 200
    g_pids, g_cams = np.array([1, 2, 1, 2, 1, 3]), np.array([1, 1, 0, 0, 1, 1])
    dist = np.array([[0.4, 0.1, 0.2, 0.3, 0.5, 0.6],  # query pid 1, camera 0: gallery 2 is its own camera, removed
                     [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])  # query pid 2, camera 1: gallery 1 removed
    picture = ranked_list(queries, lambda i: gallery[i], dist, np.array([1, 2]), np.array([0, 1]), g_pids, g_cams,
                          k=3)
    assert picture.size == (3 * (W + 2 * BORDER + GAP) + W + 2 * BORDER + 4 * GAP, 2 * (H + 2 * BORDER + GAP) + GAP)
    want = [[(1, RED), (3, RED), (0, GREEN)], [(5, RED), (4, RED), (3, GREEN)]]  # (gallery index, frame)
    for row, cells in enumerate(want):
        frame, centre = _cell_frame(picture, row, 0)
        assert frame == QUERY_FRAME and centre == (0, 0, 200)
        for col, (index, colour) in enumerate(cells, start=1):
            frame, centre = _cell_frame(picture, row, col)
            assert frame == colour and centre == (10 * (index + 1),) * 3, (row, col)


def test_queries_are_chosen_evenly_among_those_with_a_match():
    valid = np.ones(20, dtype=bool)
    valid[[0, 19]] = False
    assert chosen_queries(valid, 4).tolist() == [1, 7, 12, 18]
    assert chosen_queries(valid, 100).tolist() == list(range(1, 19))  # fewer queries than asked: all
    assert chosen_queries(np.zeros(3, dtype=bool), 4).tolist() == []


def test_the_final_evaluation_writes_the_picture_and_the_per_query_ap(tiny_split, tmp_path):
    from trainables.evaluation.ranking import evaluate
    from trainables.reid.evaluate import VISRANK_QUERIES, VISRANK_TOPK, distances, embed_split, evaluate_final
    from trainables.reid.models import IdentificationNet

    torch.manual_seed(0)
    model = IdentificationNet(tiny_split.num_train_ids, backbone="resnet18", embed_dim=16).eval()
    reid = ReidConfig(image_size=(32, 16), batch_size=8, loader_workers=0)
    final = evaluate_final(model, tiny_split, (), reid, torch.device("cpu"), run_dir=tmp_path)
    emb = embed_split(model, tiny_split, reid, torch.device("cpu"))
    res = evaluate(distances(emb, reid), emb.q_pids, emb.g_pids, emb.q_camids, emb.g_camids)
    ap = np.load(tmp_path / PER_QUERY_AP)
    assert ap.dtype == np.float32 and ap.shape == (len(tiny_split.query),)
    np.testing.assert_array_equal(np.isnan(ap), res.skipped)
    np.testing.assert_allclose(ap[~res.skipped], res.ap[~res.skipped], rtol=1e-6)
    assert float(np.nanmean(ap)) == pytest.approx(final["mAP"], rel=1e-5)
    picture = Image.open(tmp_path / RANKED_LIST)
    h, w = reid.image_size  # pad_crop: the rows are at the network's input size
    n = min(VISRANK_QUERIES, int((~res.skipped).sum()))
    assert picture.size == (w + 2 * BORDER + 4 * GAP + VISRANK_TOPK * (w + 2 * BORDER + GAP),
                            n * (h + 2 * BORDER + GAP) + GAP)
    frames = {picture.getpixel((w + 2 * BORDER + 4 * GAP + j * (w + 2 * BORDER + GAP) + 1, GAP + 1))
              for j in range(VISRANK_TOPK)}
    assert frames <= {GREEN, RED}  # every ranked cell is framed as a true or a false match


def test_a_finished_trial_logs_them_with_its_mlflow_run(tmp_path, tiny_cfg):
    """tuning._finish, on a real MLflow store: the picture beside the CMC plot, the per-query AP, the re-ranked and
    cross-domain metrics by their contract names, and the tags orchestrator.export reads."""
    import json
    import time

    from orchestrator import tracking, tuning
    from orchestrator.trials import TAG_DATA_ROOT, TAG_RUN_DIR, TAG_TEST_ROOTS, TrialContext, TrialSpec
    from trainables.config import ReidInputs, ReidResult

    cfg = tiny_cfg(f"dataset.test_root=[{tmp_path / 'Duke-Test'}]")
    client, exp_id = tracking.setup(tracking.default_tracking_uri(tmp_path), "exp", tmp_path)
    run_id, _ = tracking.get_or_create_run(client, exp_id, "trial", "sw/t", "t")  # as the sweep makes them
    trial = TrialSpec("baseline", 0)
    run_dir = tmp_path / "trials" / trial.key
    run_dir.mkdir(parents=True)
    Image.new("RGB", (20, 10), RED).save(run_dir / RANKED_LIST)
    ap = np.array([0.5, np.nan, 1.0], dtype=np.float32)
    np.save(run_dir / PER_QUERY_AP, ap)
    plain = {"rank1": 0.5, "rank5": 0.75, "rank10": 1.0, "mAP": 0.4, "mINP": 0.2}
    result = ReidResult(**plain, cmc=(0.5, 0.75, 1.0), skipped_queries=1, epoch=0, num_classes=6, num_gan=0,
                        num_train=30, reranked={**plain, "rank1": 0.625},
                        cross_domain={"duketest": {**plain, "mAP": 0.125, "rr_mAP": 0.25}})
    ctx = TrialContext(cfg, "sw", ReidInputs("/data/train-set"), str(tmp_path / "trials"), {}, log_models=False)
    tuning._finish(client, run_id, cfg, trial, result, ctx, time.perf_counter())

    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/cmc.png", f"plots/{RANKED_LIST}"}
    got = np.load(client.download_artifacts(run_id, f"evaluation/{PER_QUERY_AP}", str(tmp_path / "down")))
    np.testing.assert_array_equal(got, ap)
    run = client.get_run(run_id)
    logged = tracking.fractions(run)
    assert logged["final_rank1"] == pytest.approx(0.5) and logged["final_rr_rank1"] == pytest.approx(0.625)
    assert logged["final_xd_duketest_mAP"] == pytest.approx(0.125)
    assert logged["final_xd_duketest_rr_mAP"] == pytest.approx(0.25)
    assert run.data.tags[TAG_RUN_DIR] == str(run_dir) and run.data.tags[TAG_DATA_ROOT] == "/data/train-set"
    assert json.loads(run.data.tags[TAG_TEST_ROOTS]) == {"duketest": str(tmp_path / "Duke-Test")}
    assert run.info.status == "FINISHED"
