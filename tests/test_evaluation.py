"""trainables/evaluation/: ranking metrics (hand-computed cases and the per-query oracle), features, distances,
re-ranking, and the benchmark at small scale."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from bench.reference import reference_rank  # the per-query oracle (cmc, mAP, mINP), or None
from trainables.evaluation import ranking as ev
from trainables.evaluation.distance import compute_distance, extract_features
from trainables.evaluation.ranking import evaluate, evaluate_rank
from trainables.evaluation.rerank import re_rank


def one_query(distances, g_pids, g_camids, q_pid=1, q_cam=0, **kwargs):
    """Evaluate a single query against a small gallery."""
    return evaluate(np.array([distances], dtype=np.float32), np.array([q_pid]), np.array(g_pids),
                    np.array([q_cam]), np.array(g_camids), **kwargs)


# ----------------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------------


def test_single_query_all_rules_both_ap_modes():
    # query pid 1, camera 0. Sorted by distance:
    #   g2 0.05 pid 1 cam 0 -> same pid + camera: excluded
    #   g1 0.10 pid 2       -> negative, position 1
    #   g3 0.20 pid -1      -> junk: excluded
    #   g4 0.25 pid 0       -> distractor = negative, position 2
    #   g0 0.30 pid 1 cam 1 -> hit k=1 at position 3
    #   g5 0.50 pid 1 cam 2 -> hit k=2 at position 4
    d = [0.30, 0.10, 0.05, 0.20, 0.25, 0.50]
    pids, cams = [1, 2, 1, -1, 0, 1], [1, 1, 0, 1, 2, 2]
    std = one_query(d, pids, cams, max_rank=5)
    np.testing.assert_allclose(std.cmc, [0, 0, 1, 1, 1])
    assert std.mAP == pytest.approx((1 / 3 + 2 / 4) / 2)  # 5/12
    assert std.mINP == pytest.approx(2 / 4)  # ngood / position of the last hit
    # market: k=1, r=3: (0/2 + 1/3)/2 * 1/2 = 1/12;  k=2, r=4: (1/3 + 2/4)/2 * 1/2 = 5/24
    market = one_query(d, pids, cams, max_rank=5, ap="market")
    assert market.mAP == pytest.approx(1 / 12 + 5 / 24)  # 7/24
    np.testing.assert_allclose(market.cmc, std.cmc)


@pytest.mark.parametrize("ap, expected", [("standard", 1 / 2), ("market", (0 + 1 / 2) / 2)])
def test_same_pid_same_camera_is_excluded(ap, expected):
    # [pid 2 (neg), pid 1 cam 0 (excluded), pid 1 cam 1 (hit)] -> hit at position 2, ngood 1.
    # Counting the excluded entry as a match would give 7/12, as a negative 1/3 (standard).
    r = one_query([0.1, 0.2, 0.3], [2, 1, 1], [1, 0, 1], ap=ap, max_rank=3)
    assert r.mAP == pytest.approx(expected)
    np.testing.assert_allclose(r.cmc, [0, 1, 1])


def test_junk_is_excluded_and_distractor_is_negative():
    junk = one_query([0.1, 0.2], [-1, 1], [1, 1], max_rank=2)  # junk first: hit at position 1
    assert junk.mAP == pytest.approx(1.0)
    np.testing.assert_allclose(junk.cmc, [1, 1])
    distractor = one_query([0.1, 0.2], [0, 1], [1, 1], max_rank=2)  # pid 0 first: hit at position 2
    assert distractor.mAP == pytest.approx(0.5)
    np.testing.assert_allclose(distractor.cmc, [0, 1])


def test_ties_are_broken_by_gallery_index():
    # equal distances: the lower gallery index ranks first
    neg_first = one_query([0.5, 0.5, 0.5], [2, 1, 3], [1, 1, 1], max_rank=3)
    assert neg_first.mAP == pytest.approx(0.5)
    hit_first = one_query([0.5, 0.5, 0.5], [1, 2, 3], [1, 1, 1], max_rank=3)
    assert hit_first.mAP == pytest.approx(1.0)
    # -0.0 == +0.0 is a tie too, and negative distances sort below positive ones
    assert one_query([0.0, -0.0], [1, 2], [1, 1]).mAP == pytest.approx(1.0)
    assert one_query([-1.0, -2.0], [2, 1], [1, 1]).mAP == pytest.approx(1.0)


def small_multi_query():
    """3 queries x 5 gallery; q2 (pid 3) only has a same-camera match, so it is skipped."""
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 0, 0])
    g_pids, g_cams = np.array([1, 2, 2, 3, 0]), np.array([1, 1, 2, 0, 1])
    distmat = np.array([
        [0.2, 0.1, 0.3, 0.4, 0.5],  # q0: g1 neg, g0 HIT(2), g2, g3, g4 -> positions [2]
        [0.9, 0.1, 0.5, 0.2, 0.3],  # q1: g1 HIT(1), g3, g4, g2 HIT(4), g0 -> positions [1, 4]
        [0.1, 0.2, 0.3, 0.4, 0.5],  # q2: skipped
    ], dtype=np.float32)
    return distmat, q_pids, g_pids, q_cams, g_cams


def test_multi_query_cmc_map_minp_and_skipped_count():
    args = small_multi_query()
    with pytest.warns(RuntimeWarning, match="1 of 3 queries"):
        std = evaluate(*args, max_rank=10)  # max_rank > gallery size: padded
    np.testing.assert_allclose(std.cmc, [0.5] + [1.0] * 9)
    assert std.mAP == pytest.approx((1 / 2 + (1 / 1 + 2 / 4) / 2) / 2)  # (0.5 + 0.75) / 2
    assert std.mINP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert (std.num_valid_queries, std.num_skipped_queries) == (2, 1)
    np.testing.assert_array_equal(std.skipped, [False, False, True])
    assert std.metrics()["rank1"] == 0.5 and std.rank(5) == 1.0
    # market: q0 k=1 r=2: (0/1 + 1/2)/2 = 1/4; q1: k=1 r=1: (1 + 1)/2/2 = 1/2, k=2 r=4: (1/3 + 1/2)/2/2 = 5/24
    with pytest.warns(RuntimeWarning):
        cmc, mAP = evaluate_rank(*args, max_rank=3, ap="market")
    assert mAP == pytest.approx((1 / 4 + 1 / 2 + 5 / 24) / 2)  # 23/48
    np.testing.assert_allclose(cmc, [0.5, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    d, qp, gp, qc, gc = small_multi_query()
    with pytest.raises(ValueError, match=r"g_pids has shape \(4,\), expected \(5,\)"):
        evaluate_rank(d, qp, gp[:4], qc, gc)
    with pytest.raises(ValueError, match="q_camids"):
        evaluate_rank(d, qp, gp, qc[:2], gc)
    with pytest.raises(ValueError, match="'standard', 'market'"):
        evaluate_rank(d, qp, gp, qc, gc, ap="bogus")
    with pytest.raises(ValueError, match="2-D"):
        evaluate_rank(d[0], qp, gp, qc, gc)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(d, qp, gp, qc, gc, max_rank=0)
    with pytest.raises(ValueError, match="integers"):
        evaluate_rank(d, qp.astype(float), gp, qc, gc)
    for row, bad in ((1, np.nan), (2, -np.inf)):  # row 2 is a skipped query: still rejected
        broken = d.copy()
        broken[row, 2] = bad
        with pytest.raises(ValueError, match=f"NaN or inf \\(first in row {row}\\)"):
            evaluate_rank(broken, qp, gp, qc, gc)
        with pytest.raises(ValueError, match="NaN or inf"):
            evaluate_rank(torch.from_numpy(broken), qp, gp, qc, gc)
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(d, qp, gp, qc, np.zeros(5, int))  # every match is in the query camera


# ----------------------------------------------------------------------------------------------------
# Vectorised paths against the reference
# ----------------------------------------------------------------------------------------------------


def random_instance(rng):
    num_q, num_g = int(rng.integers(1, 13)), int(rng.integers(1, 26))
    q_pids, g_pids = rng.integers(-1, 5, num_q), rng.integers(-1, 5, num_g)
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    dtype = np.float32 if rng.random() < 0.6 else np.float64
    if rng.random() < 0.5:
        distmat = rng.integers(-2, 4, (num_q, num_g)).astype(dtype)  # many ties, some negative
    else:
        distmat = rng.random((num_q, num_g)).astype(dtype)
    return distmat, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("path", ["auto", "sparse", "dense", "dense-coarse", "torch"])
def test_vectorised_matches_reference(path, monkeypatch):
    if path == "sparse":
        monkeypatch.setattr(ev, "_DENSE_SHARE", 0)  # never dense
    elif path.startswith("dense"):
        monkeypatch.setattr(ev, "_DENSE_SHARE", 10**9)  # dense whenever float32
        if path == "dense-coarse":
            monkeypatch.setattr(ev, "_BINS", 3)  # most entries share a bin with a hit
    elif path == "torch":  # the accelerator kernel, run on CPU tensors
        monkeypatch.setattr(ev, "_prepare_distmat", lambda d: (torch.as_tensor(d), True))
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(250):
        args = random_instance(rng)
        max_rank, ap = int(rng.integers(1, 30)), ("standard", "market")[int(rng.integers(2))]
        chunk = int(rng.integers(1, args[0].shape[0] + 2))
        expected = reference_rank(*args, max_rank, ap)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if expected is None:
                with pytest.raises(ValueError, match="no query has a valid match"):
                    evaluate(*args, max_rank=max_rank, ap=ap, chunk_size=chunk)
                continue
            result = evaluate(*args, max_rank=max_rank, ap=ap, chunk_size=chunk)
        np.testing.assert_allclose(result.cmc, expected[0], rtol=0, atol=1e-12)
        assert result.mAP == pytest.approx(expected[1], abs=1e-12)
        assert result.mINP == pytest.approx(expected[2], abs=1e-12)
        checked += 1
    assert checked > 150


def test_larger_instance_both_paths_agree_with_reference():
    rng = np.random.default_rng(3)
    num_q, num_g = 60, 400
    q_pids, g_pids = rng.integers(1, 30, num_q), rng.integers(-1, 30, num_g)
    q_cams, g_cams = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
    same = (q_pids[:, None] == g_pids[None, :]).astype(np.float32)
    distmat = (rng.random((num_q, num_g)) + 0.9 * (1 - same)).astype(np.float32)  # trained-like: sparse path
    random = rng.random((num_q, num_g)).astype(np.float32)  # untrained-like: dense path
    for d in (distmat, random):
        for ap in ("standard", "market"):
            expected = reference_rank(d, q_pids, g_pids, q_cams, g_cams, 50, ap)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                cmc, mAP = evaluate_rank(d, q_pids, g_pids, q_cams, g_cams, ap=ap)
            np.testing.assert_allclose(cmc, expected[0], atol=1e-12)
            assert mAP == pytest.approx(expected[1], abs=1e-12)


def test_dense_path_extreme_values(monkeypatch):
    # a row range that overflows float32 falls back to the sparse path; a constant row is one bin
    monkeypatch.setattr(ev, "_DENSE_SHARE", 10**9)
    big = np.float32(3e38)
    distmat = np.array([[big, -big, 0.0, 1.0, -1.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    q_pids, g_pids = np.array([1, 1]), np.array([1, 2, 1, 3, 1, 2])
    q_cams, g_cams = np.array([0, 0]), np.array([1, 1, 1, 1, 1, 1])
    for ap in ("standard", "market"):
        expected = reference_rank(distmat, q_pids, g_pids, q_cams, g_cams, 6, ap)
        cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=6, ap=ap)
        np.testing.assert_allclose(cmc, expected[0])
        assert mAP == pytest.approx(expected[1], abs=1e-12)


def test_torch_inputs_match_numpy():
    args = small_multi_query()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        base = evaluate(*args, max_rank=4)
        tensors = evaluate(*(torch.from_numpy(np.asarray(a)) for a in args), max_rank=4)
        half = evaluate(torch.from_numpy(args[0]).half(), *args[1:], max_rank=4)
    np.testing.assert_array_equal(tensors.cmc, base.cmc)
    assert tensors.mAP == base.mAP and half.mAP == base.mAP
    np.testing.assert_array_equal(tensors.ap, base.ap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_matches_numpy():
    rng = np.random.default_rng(5)
    for _ in range(20):
        args = random_instance(rng)
        if reference_rank(*args, 10, "standard") is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            base = evaluate(*args, max_rank=10)
            gpu = evaluate(torch.from_numpy(args[0]).cuda(), *args[1:], max_rank=10)
        np.testing.assert_allclose(gpu.cmc, base.cmc)
        assert gpu.mAP == pytest.approx(base.mAP, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# Features and distances
# ----------------------------------------------------------------------------------------------------


class ModeRecorder(nn.Module):
    """Linear map of the flattened image (not flip-symmetric); records train/eval mode per call."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 2 * 4, 5)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.linear(x.flatten(1))


def tiny_loader():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 2, 4, generator=gen)
    items = [{"img": images[i], "pid": torch.tensor(i % 3), "camid": torch.tensor(i % 2)} for i in range(7)]
    return images, DataLoader(items, batch_size=3, shuffle=False)


def test_extract_features_flip_and_normalise():
    torch.manual_seed(0)
    model, (images, loader) = ModeRecorder(), tiny_loader()
    model.train()
    feats, pids, camids = extract_features(model, loader)
    assert model.training and model.modes and not any(model.modes)  # ran in eval, mode restored
    with torch.no_grad():
        expected = model.linear(images.flatten(1)) + model.linear(images.flip(3).flatten(1))
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(7))
    np.testing.assert_array_equal(pids, np.arange(7) % 3)
    np.testing.assert_array_equal(camids, np.arange(7) % 2)
    raw, _, _ = extract_features(model, loader, flip=False, normalize=False)
    torch.testing.assert_close(raw, model.linear(images.flatten(1)).detach())


def test_extract_features_rejects_bad_batches():
    model = ModeRecorder()
    with pytest.raises(ValueError, match="camid"):
        extract_features(model, [{"img": torch.zeros(1, 3, 2, 4), "pid": torch.zeros(1)}])
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [])


def test_compute_distance_both_metrics():
    gen = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(5, 8, generator=gen), torch.randn(7, 8, generator=gen)
    cosine = compute_distance(qf, gf, "cosine", chunk_size=2)
    expected = 1 - (qf / qf.norm(dim=1, keepdim=True)) @ (gf / gf.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cosine, expected, atol=1e-6, rtol=1e-5)
    euclid = compute_distance(qf, gf.numpy(), "euclidean", chunk_size=3)
    torch.testing.assert_close(euclid, ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'cosine', 'euclidean'"):
        compute_distance(qf, gf, "manhattan")
    with pytest.raises(ValueError, match="same D"):
        compute_distance(qf, gf[:, :4])


# ----------------------------------------------------------------------------------------------------
# Re-ranking
# ----------------------------------------------------------------------------------------------------


def naive_re_rank(qg, qq, gg, k1, k2, lam):
    """The paper's steps with Python sets, one sample at a time."""
    dist = np.maximum(np.block([[qq, qg], [qg.T, gg]]).astype(np.float64), 0)
    dist /= dist.max(axis=1, keepdims=True)
    n, num_q = len(dist), len(qg)
    ranked = [sorted(range(n), key=lambda j, i=i: (dist[i, j], j)) for i in range(n)]

    def reciprocal(i, k):
        return {j for j in ranked[i][:k + 1] if i in ranked[j][:k + 1]}

    v = np.zeros((n, n))
    for p in range(n):
        r_p = reciprocal(p, k1)
        expanded = set(r_p)
        for q in r_p:
            r_q = reciprocal(q, max(1, round(k1 / 2)))
            if len(r_p & r_q) >= 2 / 3 * len(r_q):
                expanded |= r_q
        for g in expanded:
            v[p, g] = np.exp(-dist[p, g])
        v[p] /= v[p].sum()
    v = np.stack([v[ranked[p][:k2]].mean(axis=0) for p in range(n)])
    jac = np.array([[1 - np.minimum(v[p], v[num_q + g]).sum() / np.maximum(v[p], v[num_q + g]).sum()
                     for g in range(len(gg))] for p in range(num_q)])
    return (1 - lam) * jac + lam * dist[:num_q, num_q:]


def clustered(seed, ids=6, per_id=5, noise=0.9):
    rng = np.random.default_rng(seed)
    feats = np.repeat(rng.standard_normal((ids, 16)), per_id, axis=0) + noise * rng.standard_normal((ids * per_id, 16))
    pids, cams = np.repeat(np.arange(1, ids + 1), per_id), np.tile(np.arange(per_id), ids)
    q = cams == 0
    qf, gf = torch.tensor(feats[q], dtype=torch.float32), torch.tensor(feats[~q], dtype=torch.float32)
    dists = [compute_distance(a, b, "euclidean").numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    return dists, (pids[q], pids[~q], cams[q], cams[~q])


def test_re_rank_matches_naive_implementation():
    (qg, qq, gg), _ = clustered(seed=2)
    for k1, k2, lam in ((6, 3, 0.3), (4, 1, 0.0), (10, 4, 1.0)):
        fast = re_rank(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
        assert fast.shape == qg.shape and fast.dtype == np.float32 and np.isfinite(fast).all()
        np.testing.assert_allclose(fast, naive_re_rank(qg, qq, gg, k1, k2, lam), atol=1e-5)


def test_re_rank_keeps_or_improves_an_easy_ranking():
    for seed in range(3):
        (qg, qq, gg), labels = clustered(seed, ids=8, per_id=6)
        before = evaluate(qg, *labels)
        after = evaluate(re_rank(qg, qq, gg, k1=5, k2=3), *labels)
        assert after.mAP >= before.mAP - 1e-9
    assert before.mAP < 0.9 and after.mAP > before.mAP  # seed 2 starts imperfect and gets better


def test_re_rank_rejects_bad_input():
    (qg, qq, gg), _ = clustered(seed=0)
    with pytest.raises(ValueError, match="g_g_dist"):
        re_rank(qg, qq, gg[:-1, :-1])
    with pytest.raises(ValueError, match="k1"):
        re_rank(qg, qq, gg, k1=len(qg) + len(gg))
    with pytest.raises(ValueError, match="lambda_value"):
        re_rank(qg, qq, gg, lambda_value=1.5)


def test_benchmark_runs_and_agrees_at_small_scale(capsys):
    from bench.evaluation import main

    assert main(["--queries", "60", "--gallery", "400", "--dim", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "reproduce: python -m bench.evaluation --queries 60" in out and " NO" not in out
