"""The stages of a pool besides the DCGAN's generation: the pool stage (synthetic_ids, folder), the check of a folder
before any cluster time, and the pool-quality measure every pool gets. Part of the stage DAG of
:mod:`orchestrator.stages` (same conventions: training imports only inside ``build``)."""

from __future__ import annotations

from pathlib import Path

from datasets.generated import GeneratedStore
from orchestrator.config import Config
from orchestrator.stage_cache import GeneratedOut, PoolQualityOut, StageNode, StageResult, same_data, stage_key


def pool_node(cfg: Config, pool: str, n: int, dataset: StageNode, resources: dict[str, float]) -> StageNode:
    """A pool that is not the DCGAN's (``datasets.pools``), stored like a generated one at ``gan.image_size``:
    synthetic_ids (unseen identities drawn by the synthetic generator) or folder (``labels.pool_root``)."""
    size, ds, root = tuple(cfg.gan.image_size), cfg.dataset, cfg.labels.pool_root

    def build(folder: Path, data: StageResult) -> GeneratedOut:
        from datasets import pools

        if pool == "synthetic_ids":
            store = pools.write_synthetic_ids_pool(folder / "store", n, size, **pools.synthetic_ids_args(ds))
        else:
            store = pools.write_folder_pool(folder / "store", n, size, root)
        return GeneratedOut(str(store.root), store.n)

    def check(folder: Path, out: GeneratedOut) -> list[str]:
        return check_store(out)

    extra = {"pool": pool, "n": n, "size": list(size)}
    if pool == "folder":  # the folder and a fingerprint of its files (names, sizes, times: a changed folder re-runs)
        from datasets.pools import folder_listing

        extra.update(root=str(Path(root).expanduser().resolve()), files=folder_listing(root, n))
    # the synthetic_ids pool draws from the dataset's generator: its fields, not the cross-domain test sets
    key = stage_key(same_data(cfg), "dataset", extra=extra) if pool == "synthetic_ids" else stage_key(cfg, extra=extra)
    return StageNode("pool", key, GeneratedOut, (dataset.name,), resources, build, check)


def check_pools(cfg: Config, n: int) -> None:
    """Before any cluster time: a folder pool must exist and hold ``n`` images (the largest #GAN); ValueError
    naming the folder otherwise (a file that does not decode is named when the pool stage reads it)."""
    if n > 0 and "folder" in (cfg.labels.pool, *cfg.sweep.pools):
        from datasets.pools import check_folder_pool

        check_folder_pool(cfg.labels.pool_root, n)


def check_store(out: GeneratedOut) -> list[str]:
    """A cached pool's problems: incomplete, or a shard that does not match the store's table."""
    try:
        store = GeneratedStore(out.store)
        return store.verify() if store.complete else ["store is incomplete"]
    except Exception as err:  # noqa: BLE001 - a damaged table or shard: rebuild, never fail the sweep here
        return [f"{type(err).__name__}: {err}"]


def pool_quality_node(cfg: Config, dataset: StageNode, baseline: StageNode, generated: StageNode,
                      resources: dict[str, float]) -> StageNode:
    """The generated pool against the real training images (``trainables.reid.pool_quality``), in the feature space
    of ``baseline``; its sheet is logged with the stage's MLflow run."""
    key = stage_key(cfg, extra={"baseline": baseline.key, "generate": generated.key})
    reid = cfg.reid

    def build(folder: Path, data: StageResult, base: StageResult, gen: StageResult) -> PoolQualityOut:
        from trainables.reid.pool_quality import measure_pool

        return PoolQualityOut(**measure_pool(base.out.run_dir, gen.out.store, data.out.root, reid, folder))

    def check(folder: Path, out: PoolQualityOut) -> list[str]:
        return [] if Path(out.sheet).is_file() else [f"{out.sheet} is missing"]

    return StageNode("pool_quality", key, PoolQualityOut, (dataset.name, baseline.name, generated.name), resources,
                     build, check, "pool_sheet.png")
