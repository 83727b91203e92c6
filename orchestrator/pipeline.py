"""The cached stages before the sweep: dataset -> DCGAN -> generation -> baseline re-ID -> sMpRL labels.

Each stage's output lives in ``<storage>/stages/<stage>-<key>/``, where ``key`` hashes exactly the config fields
the stage depends on (so a sweep over label hyperparameters trains no GAN). A stage counts as done only when
its ``done.json`` (written atomically, last) carries that key; an output that fails its check is moved aside
(never deleted) and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from datasets.generated import GeneratedStore, atomic_write_bytes
from orchestrator.config import Config, replace, to_dict

DONE = "done.json"
# Fields that change where/how fast a stage runs but not what it produces.
RUNTIME_FIELDS = ("num_workers", "use_gpu", "loader_workers", "amp", "channels_last")


@dataclass(frozen=True)
class StageResult:
    stage: str
    key: str
    path: Path
    cached: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Paths:
    storage: Path

    @property
    def stages(self) -> Path:
        return self.storage / "stages"

    @property
    def datasets(self) -> Path:
        return self.storage / "datasets"

    @property
    def tune(self) -> Path:
        return self.storage / "tune"

    @property
    def trials(self) -> Path:
        return self.storage / "trials"


def stage_key(cfg: Config, *sections: str, extra: dict[str, Any] | None = None) -> str:
    """Hash of the named config sections without their runtime-only fields (workers, GPU, AMP)."""
    tree = to_dict(cfg)
    picked = {}
    for s in sections:
        node = tree
        for part in s.split("."):
            node = node[part]
        picked[s] = {k: v for k, v in node.items() if k not in RUNTIME_FIELDS} if isinstance(node, dict) else node
    blob = json.dumps({"fields": picked, "extra": extra or {}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_stage(paths: Paths, stage: str, key: str, build: Callable[[Path], dict[str, Any]],
              check: Callable[[Path, dict[str, Any]], list[str]] | None = None) -> StageResult:
    """Return the cached output of (stage, key), or build it into its folder and mark it done."""
    folder = paths.stages / f"{stage}-{key}"
    done = folder / DONE
    if done.is_file():
        try:
            record = json.loads(done.read_text())
        except json.JSONDecodeError:
            record = {}
        problems = ["done.json is damaged"] if record.get("key") != key else (check(folder, record["info"])
                                                                               if check else [])
        if not problems:
            return StageResult(stage, key, folder, True, record["info"])
        aside = folder.with_name(f"{folder.name}.corrupt-{time.time_ns()}")
        print(f"[pipeline] {stage} cache at {folder} is unusable ({'; '.join(problems)}); "
              f"moved to {aside.name} and rebuilding", flush=True)
        shutil.move(str(folder), str(aside))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[pipeline] {stage}: building {folder.name}", flush=True)
    start = time.perf_counter()
    info = build(folder)
    info["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_bytes(done, json.dumps({"key": key, "stage": stage, "info": info}, indent=1).encode())
    return StageResult(stage, key, folder, False, info)


# ------------------------------------------------------------------------------------------ stages

def dataset_stage(cfg: Config, paths: Paths) -> StageResult:
    """The dataset root: a real dataset is parsed and every image decoded once; the synthetic one is drawn."""
    from datasets.check import check_images
    from datasets.market1501 import load

    if cfg.dataset.name == "synthetic":
        from trainables.reid import prepare_dataset

        root = prepare_dataset(cfg, paths.datasets)
        split = load(root)
        return StageResult("dataset", stage_key(cfg, "dataset"), Path(root), True, {"summary": split.summary()})

    split = load(cfg.dataset.root)  # names and layout: fails fast, before anything is written

    def build(folder: Path) -> dict[str, Any]:
        check_images((*split.train, *split.query, *split.gallery))  # decodes every image, once per dataset
        return {"root": str(Path(cfg.dataset.root).resolve()), "summary": split.summary()}

    res = run_stage(paths, "dataset", stage_key(cfg, "dataset"), build)
    return StageResult(res.stage, res.key, Path(res.info["root"]), res.cached, res.info)


def gan_stage(cfg: Config, paths: Paths, data_root: Path) -> StageResult:
    from trainables.dcgan import train_gan
    from trainables.generation import file_sha256

    def build(folder: Path) -> dict[str, Any]:
        generator = train_gan(cfg, data_root, folder, "train")
        return {"generator": str(generator), "epochs": cfg.gan.epochs, "sha256": file_sha256(generator)}

    def check(folder: Path, info: dict[str, Any]) -> list[str]:
        path = Path(info["generator"])
        if not path.is_file():
            return [f"{path} is missing"]
        return [] if file_sha256(path) == info.get("sha256") else [f"{path} does not match its recorded checksum"]

    return run_stage(paths, "gan", stage_key(cfg, "dataset", "gan"), build, check)


def generate_stage(cfg: Config, paths: Paths, gan: StageResult, n: int) -> StageResult:
    from trainables.generation import generate

    key = stage_key(cfg, "dataset", "gan", extra={"n": n})

    def build(folder: Path) -> dict[str, Any]:
        store = generate(gan.info["generator"], folder / "store", n, seed=cfg.gan.seed)
        return {"store": str(store.root), "n": store.n}

    def check(folder: Path, info: dict[str, Any]) -> list[str]:
        try:
            store = GeneratedStore(info["store"])
        except (FileNotFoundError, ValueError) as err:
            return [str(err)]
        return store.verify() if store.complete else ["store is incomplete"]

    return run_stage(paths, "generate", key, build, check)


def baseline_key(cfg: Config) -> str:
    return stage_key(cfg, "dataset", "reid", "labels.real_smoothing")


def baseline_stage(cfg: Config, paths: Paths, data_root: Path) -> StageResult:
    """Re-ID on real data only: the sweep's baseline and the model that sMpRL labels come from."""
    from trainables.reid import ReidInputs, train_reid

    base = replace(cfg, **{"labels.method": "baseline", "labels.num_gan": 0})
    if cfg.sweep.in_process and cfg.reid.num_workers <= 1:  # as the trials do: no Train worker group for one
        base = replace(base, **{"reid.num_workers": 0})

    def build(folder: Path) -> dict[str, Any]:
        res = train_reid(base, ReidInputs(str(data_root)), folder, "train")
        return {"run_dir": str(folder / "train"), "metrics": {k: v for k, v in res.items() if k != "cmc"},
                "cmc": res.get("cmc", [])}

    def check(folder: Path, info: dict[str, Any]) -> list[str]:
        from trainables.runtime import latest_checkpoint

        return [] if latest_checkpoint(info["run_dir"]) else ["no checkpoint"]

    return run_stage(paths, "baseline", baseline_key(cfg), build, check)


def smprl_stage(cfg: Config, paths: Paths, baseline: StageResult, generated: StageResult) -> StageResult:
    """Static multi-pseudo labels: the baseline's class ranks for every generated image, stored as uint16."""
    import torch

    from trainables.labels import predict_static_ranks
    from trainables.reid import load_trained
    from trainables.reid_data import test_loader

    key = stage_key(cfg, extra={"baseline": baseline.key, "generate": generated.key})
    name = f"smprl-{key}"

    def build(folder: Path) -> dict[str, Any]:
        model, state = load_trained(baseline.info["run_dir"])
        store = GeneratedStore(generated.info["store"])
        device = torch.device("cuda" if cfg.reid.use_gpu and torch.cuda.is_available() else "cpu")
        loader = test_loader(store.records(), cfg.reid.image_size, batch_size=2 * cfg.reid.batch_size,
                             workers=cfg.reid.loader_workers)
        ranks = predict_static_ranks(model.to(device), loader, logits_fn=lambda m, x: m.classify(x), device=device)
        store.write_labels(name, ranks, {"baseline": baseline.key, "num_classes": state["num_classes"]})
        return {"labels": name, "store": str(store.root), "n": int(ranks.shape[0])}

    def check(folder: Path, info: dict[str, Any]) -> list[str]:
        try:
            found = GeneratedStore(info["store"]).read_labels(info["labels"])
        except (FileNotFoundError, ValueError) as err:
            return [str(err)]
        return [] if found is not None else ["label file missing"]

    return run_stage(paths, "smprl", key, build, check)
