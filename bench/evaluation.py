"""Benchmark `trainables.evaluation.evaluate_rank` against the per-query reference (bench/reference.py).

Generates Market-1501-scale data (3,368 queries x 15,913 gallery, 2,048-d features, 750 test ids, 6
cameras, ~2,800 distractors with pid 0 and ~3,800 junk entries with pid -1), times the distance matrix,
then times both implementations on the same distances for both AP modes and checks that they agree
(CMC and mAP within 1e-9; exit status 1 otherwise). Two scenarios: "trained" (features clustered by id
with camera bias and per-image noise: rank-1 ~0.91, mAP ~0.58, about a ResNet-50 baseline) and
"untrained" (random features: true matches spread over the whole ranking, the worst case for us).

    python -m bench.evaluation [--queries 3368] [--gallery 15913] [--dim 2048] [--seed 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench.reference import reference_rank
from trainables.evaluation import evaluate_rank
from trainables.evaluation.distance import compute_distance

NUM_CAMS = 6
IDS_PER_QUERY = 750 / 3368  # Market-1501 test split
DISTRACTOR_SHARE = 2798 / 15913  # pid 0 share of the gallery
JUNK_SHARE = 3819 / 15913  # pid -1 share of the gallery
TOLERANCE = 1e-9
NOISE = 2.9  # per-image noise of the "trained" 2048-d features (unit-scale id centres); x (dim/2048)^0.25


def market_like_labels(num_query: int, num_gallery: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """pids/camids with Market's structure: each id queried once in each of >= 2 of its cameras."""
    num_ids = max(1, round(num_query * IDS_PER_QUERY))
    if not 2 * num_ids <= num_query <= NUM_CAMS * num_ids:
        raise ValueError(f"--queries {num_query} is too small for a Market-like split (need >= 2)")
    cams = np.argsort(rng.random((num_ids, NUM_CAMS)), axis=1)  # [ids, 6] random camera order per id
    slots = np.zeros((num_ids, NUM_CAMS), bool)  # query (id, camera) slots
    slots[np.arange(num_ids)[:, None], cams[:, :2]] = True  # every id in >= 2 cameras
    free = np.flatnonzero(~slots.ravel())
    slots.ravel()[rng.choice(free, num_query - 2 * num_ids, replace=False)] = True
    q_idx, q_cam = np.nonzero(slots)
    num_distractors = round(num_gallery * DISTRACTOR_SHARE)
    num_junk = round(num_gallery * JUNK_SHARE)
    extra = num_gallery - num_distractors - num_junk - num_query
    if extra < 0:
        raise ValueError(f"--gallery {num_gallery} is too small for {num_query} queries")
    # one gallery image in every queried (id, camera) -- so same-camera entries to exclude exist -- and
    # the rest spread over random ids and cameras
    g_idx = np.concatenate([q_idx, rng.integers(0, num_ids, extra)])
    g_cam = np.concatenate([q_cam, rng.integers(0, NUM_CAMS, extra)])
    g_pid = np.concatenate([g_idx + 1, np.zeros(num_distractors, int), -np.ones(num_junk, int)])
    g_cam = np.concatenate([g_cam, rng.integers(0, NUM_CAMS, num_distractors + num_junk)])
    junk_of = rng.integers(0, num_ids, num_junk)  # junk = bad detections of real ids
    return dict(num_ids=num_ids, q_idx=q_idx, q_pid=q_idx + 1, q_cam=q_cam, g_idx=g_idx, g_pid=g_pid,
                g_cam=g_cam, junk_of=junk_of, num_distractors=num_distractors)


def market_like_features(lab: dict, dim: int, scenario: str,
                         rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Query [Q, dim] and gallery [G, dim] float32 features for the labels of `market_like_labels`."""
    num_q, num_g = len(lab["q_pid"]), len(lab["g_pid"])
    if scenario == "untrained":
        feats = rng.standard_normal((num_q + num_g, dim), dtype=np.float32)
        return torch.from_numpy(feats[:num_q]), torch.from_numpy(feats[num_q:])
    center = rng.standard_normal((lab["num_ids"], dim), dtype=np.float32)
    cam_bias = 0.6 * rng.standard_normal((NUM_CAMS, dim), dtype=np.float32)
    distractor = rng.standard_normal((lab["num_distractors"], dim), dtype=np.float32)
    g_center = np.concatenate([center[lab["g_idx"]], distractor, 0.5 * center[lab["junk_of"]]])
    q_center = center[lab["q_idx"]]

    noise = NOISE * (dim / 2048) ** 0.25  # id separation grows like sqrt(dim) / noise^2: same difficulty

    def noisy(base: np.ndarray, cams: np.ndarray) -> np.ndarray:
        hardness = rng.lognormal(0.0, 0.2, size=(len(base), 1)).astype(np.float32)  # some images are hard
        return base + cam_bias[cams] + noise * hardness * rng.standard_normal(base.shape, dtype=np.float32)

    return torch.from_numpy(noisy(q_center, lab["q_cam"])), torch.from_numpy(noisy(g_center, lab["g_cam"]))


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run_scenario(scenario: str, args: argparse.Namespace) -> list[tuple]:
    """Time distances, ours and the reference for one scenario; rows of the result table."""
    rng = np.random.default_rng(args.seed)
    lab = market_like_labels(args.queries, args.gallery, rng)
    qf, gf = market_like_features(lab, args.dim, scenario, rng)
    dist_s, dist = best_time(lambda: compute_distance(qf, gf, "cosine").numpy(), 1)
    labels = (lab["q_pid"], lab["g_pid"], lab["q_cam"], lab["g_cam"])
    rows = []
    for ap in ("standard", "market"):
        ours_s, (cmc, mAP) = best_time(lambda: evaluate_rank(dist, *labels, max_rank=50, ap=ap), args.repeats)
        # not None: evaluate_rank above already raised ValueError if no query has a valid match
        ref_s, (ref_cmc, ref_mAP, _) = best_time(lambda: reference_rank(dist, *labels, 50, ap), 1)
        rows.append((scenario, ap, dist_s, ours_s, ref_s, cmc[0], mAP,
                     float(np.abs(cmc - ref_cmc).max()), abs(mAP - ref_mAP)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs of ours (reference: 1 run)")
    parser.add_argument("--scenario", choices=("trained", "untrained", "both"), default="both")
    args = parser.parse_args(argv)
    if min(args.repeats, args.dim) < 1:
        parser.error("--repeats and --dim must be >= 1")
    scenarios = ("trained", "untrained") if args.scenario == "both" else (args.scenario,)
    try:
        rows = [row for s in scenarios for row in run_scenario(s, args)]
    except ValueError as err:
        parser.error(str(err))
    header = ("scenario", "ap", "dist_s", "ours_s", "ref_s", "speedup", "rank1", "mAP", "max|dcmc|", "|dmAP|", "agree")
    lab = market_like_labels(args.queries, args.gallery, np.random.default_rng(args.seed))
    print(f"{args.queries} queries x {args.gallery} gallery, dim {args.dim}: {lab['num_ids']} ids, {NUM_CAMS} "
          f"cameras, {lab['num_distractors']} distractors (pid 0), {len(lab['junk_of'])} junk (pid -1); "
          f"{torch.get_num_threads()} torch threads; ours = best of {args.repeats}, reference = 1 run")
    print("".join(f"{h:>11}" for h in header))
    ok = True
    for scenario, ap, dist_s, ours_s, ref_s, rank1, mAP, dcmc, dmap in rows:
        agree = dcmc <= TOLERANCE and dmap <= TOLERANCE
        ok &= agree
        cells = (scenario, ap, f"{dist_s:.3f}", f"{ours_s:.3f}", f"{ref_s:.3f}", f"{ref_s / ours_s:.1f}x",
                 f"{rank1:.4f}", f"{mAP:.4f}", f"{dcmc:.1e}", f"{dmap:.1e}", "yes" if agree else "NO")
        print("".join(f"{c:>11}" for c in cells))
    print("reproduce: python -m bench.evaluation " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
