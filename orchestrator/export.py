"""``python -m orchestrator.export RUN_ID``: a finished trial's final-model features of the query and gallery images,
written to a file (npz, or parquet: one row per image) for one's own analysis.

The driver reads the trial's MLflow run (its tags name the run folder holding the final checkpoint, the dataset and
the cross-domain test sets: ``orchestrator.trials.TAG_RUN_DIR`` ...), checks them, and starts one Ray task with
explicit resources (1 CPU; 1 GPU when the run trained on one and the cluster has one) that loads the checkpoint
(``trainables.reid.loop.load_trained``) and embeds the split exactly as the final evaluation did
(``trainables.reid.evaluate.embed_split``: flip test, L2-normalised). The driver imports no torch; it only writes the
file. npz keys: ``{query,gallery}_{features,pids,camids,paths}`` (float32 [N, D], int64, int64, str).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.trials import TAG_DATA_ROOT, TAG_RUN_DIR, TAG_TEST_ROOTS

SIDES = ("query", "gallery")
FORMATS = (".npz", ".parquet")
STATE_FILE = "state.pt"  # trainables.checkpoints.STATE_FILE (that module imports torch): a checkpoint's state


@dataclass(frozen=True)
class Source:
    """What to embed: the run folder of a trial's final model, the split's folder, and whether it trained on a GPU."""

    run_id: str
    run_dir: str
    root: str
    split: str  # "test" (the trial's own dataset) or a cross-domain test set's name
    use_gpu: bool


def resolve_run(client, ref: str, experiment: str = "mprl") -> str:
    """``ref`` as a run id: a run id itself, or the name of a finished trial (``lsro-n64-paper-kall-s0``: the latest
    sweep's that finished it) or single run (``reid-lsro-360``) of ``experiment``; ValueError otherwise."""
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return ref
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else [  # finished trials and single runs with a model to export, the latest first
        r for kind in ("trial", "single") for r in client.search_runs(
            [exp.experiment_id], f"tags.`mprl.kind` = '{kind}' and attributes.run_name = '{ref}' and "
                                 f"attributes.status = 'FINISHED' and tags.`{TAG_RUN_DIR}` != ''", max_results=1,
            order_by=["attributes.start_time DESC"])]
    if not runs:
        raise ValueError(f"{ref!r} is neither a run id nor a trial of experiment {experiment!r} at "
                         f"{client.tracking_uri} (trial names look like lsro-n64-paper-kall-s0)")
    return runs[0].info.run_id


def find_source(client, run_id: str, split: str = "test") -> Source:
    """The trial run ``run_id``'s model and the folder of ``split``; ValueError naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no MLflow run {run_id!r} at {client.tracking_uri}") from None
    tags, params = run.data.tags, run.data.params
    if TAG_RUN_DIR not in tags:
        raise ValueError(f"run {run_id} has no model to export: no {TAG_RUN_DIR} tag (not a finished trial, or one "
                         f"logged before orchestrator.export existed)")
    run_dir = tags[TAG_RUN_DIR]
    if not Path(run_dir).is_dir() or not any(Path(run_dir).rglob(STATE_FILE)):
        raise ValueError(f"run {run_id} has no model to export: no checkpoint in its run folder {run_dir}")
    tests = json.loads(tags.get(TAG_TEST_ROOTS, "{}"))
    if split == "test":
        root = tags.get(TAG_DATA_ROOT, "")
    elif split in tests:
        root = tests[split]
    else:
        raise ValueError(f"--split {split!r}: run {run_id} was tested on 'test' (its dataset)"
                         f"{''.join(f', {n!r}' for n in tests)} only (dataset.test_root's names)")
    if not Path(root).is_dir():
        raise ValueError(f"the {split} images of run {run_id} are gone: {root!r} is not a folder")
    return Source(run_id, run_dir, root, split, params.get("reid.use_gpu") == "True")


def extract(run_dir: str, root: str, use_gpu: bool) -> dict[str, np.ndarray]:
    """In the Ray task: the final checkpoint's features of ``root``'s query and gallery images (no decoded cache)."""
    from datasets.market1501 import load_test
    from trainables.config import ReidConfig, build
    from trainables.reid.evaluate import embed_split
    from trainables.reid.loop import load_trained
    from trainables.runtime import device_for

    model, state = load_trained(run_dir)
    reid = build(ReidConfig, state["reid"] if "reid" in state else state["config"]["reid"], "reid.")  # as load_trained
    device = device_for(use_gpu)
    split = load_test(root)
    emb = embed_split(model.to(device), split, reid, device)
    out: dict[str, np.ndarray] = {}
    for side, feats, pids, camids, records in (("query", emb.qf, emb.q_pids, emb.q_camids, split.query),
                                               ("gallery", emb.gf, emb.g_pids, emb.g_camids, split.gallery)):
        out.update({f"{side}_features": feats.float().cpu().numpy(), f"{side}_pids": pids.astype(np.int64),
                    f"{side}_camids": camids.astype(np.int64),
                    f"{side}_paths": np.array([r.path for r in records], dtype=str)})
    return out


def run_extract(source: Source) -> dict[str, np.ndarray]:
    """:func:`extract` as one Ray task (Ray must be initialised): 1 CPU, and 1 GPU when the run used one and the
    cluster has one."""
    import ray

    gpu = source.use_gpu and ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)(extract)
    return ray.get(task.remote(source.run_dir, source.root, gpu))


def write(features: dict[str, np.ndarray], out: Path) -> Path:
    """npz (the arrays as they are) or parquet (one row per image: side, index, path, pid, camid, and the feature as
    a fixed-size list of float32)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, **features)
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = features["query_features"].shape[1]
    parts = []
    for side in SIDES:
        n = len(features[f"{side}_pids"])
        flat = pa.array(np.ascontiguousarray(features[f"{side}_features"], dtype=np.float32).reshape(-1))
        parts.append(pa.table({"side": pa.array([side] * n), "index": pa.array(np.arange(n, dtype=np.int64)),
                               "path": pa.array(features[f"{side}_paths"].tolist()),
                               "pid": pa.array(features[f"{side}_pids"]), "camid": pa.array(features[f"{side}_camids"]),
                               "feature": pa.FixedSizeListArray.from_arrays(flat, dim)}))
    pq.write_table(pa.concat_tables(parts), out)
    return out


def export(client, run_id: str, out: Path, split: str = "test") -> Path:
    """Find the run (no cluster time on a bad one), embed on Ray, write ``out``."""
    if out.suffix not in FORMATS:
        raise ValueError(f"--out {out}: the file name must end in {' or '.join(FORMATS)}")
    return write(run_extract(find_source(client, run_id, split)), out)


def open_client(tracking_uri: str | None, storage: str):
    """An MLflow client of an existing store (no database file created); ValueError / ConnectionError naming it."""
    from orchestrator import tracking

    uri = tracking_uri or tracking.default_tracking_uri(Path(storage))
    tracking.check_reachable(uri)
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if db is not None and not Path(db).is_file():
        raise ValueError(f"no MLflow store at {db}: pass the sweep's cluster.storage_path as --storage, or "
                         f"--tracking-uri")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.export",
                                description="Write a finished trial's final-model features of the query and gallery "
                                            "images to a file (npz, or parquet: one row per image).")
    p.add_argument("run_id", metavar="RUN", help="a finished trial: its MLflow run id, or its name "
                                                 "(lsro-n64-paper-kall-s0: that trial of the latest sweep with it)")
    p.add_argument("--experiment", default="mprl", help="the MLflow experiment of a trial named by name "
                                                        "(default: mprl)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--tracking-uri", default=None,
                       help="an MLflow tracking URI (http://host:5000, sqlite:///path) (default: sqlite:///"
                            "<--storage>/mlflow.db)")
    where.add_argument("--storage", default="runs", help="the sweep's cluster.storage_path (default: runs)")
    p.add_argument("--out", default=None, help="the file to write, .npz or .parquet (default: "
                                                "features-<run id>-<split>.npz)")
    p.add_argument("--split", default="test", help="test (the trial's dataset) or the name of one of its "
                                                   "dataset.test_root sets, e.g. dukemtmcreid (default: test)")
    p.add_argument("--address", default=None, help="a Ray cluster to run the extraction on (default: a local Ray)")
    return p.parse_args(argv)


def _ray(address: str | None) -> None:
    """The project's one ``ray.init`` (``orchestrator.cluster``): the cluster at ``address``, else a local one."""
    import ray

    from orchestrator import cluster

    if ray.is_initialized():
        return
    if address:
        from orchestrator.config import load_config

        cluster.connect(load_config("cpu", overrides=[f"cluster.address={address}"]))
    else:
        cluster.start_local_ray(1)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    out = Path(args.out or f"features-{args.run_id}-{args.split}.npz")  # a trial's name or its run id
    try:
        client = open_client(args.tracking_uri, args.storage)
        if out.suffix not in FORMATS:
            raise ValueError(f"--out {out}: the file name must end in {' or '.join(FORMATS)}")
        source = find_source(client, resolve_run(client, args.run_id, args.experiment), args.split)
    except (ValueError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _ray(args.address)
    features = run_extract(source)
    q, g = features["query_features"], features["gallery_features"]
    print(f"wrote {write(features, out)}: {len(q)} query + {len(g)} gallery features of dimension {q.shape[1]} "
          f"(run {source.run_id}, split {source.split}: {source.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
