"""``python -m orchestrator.train gan|reid``: one stage alone, outside a sweep (presets and overrides as the sweep).

    python -m orchestrator.train gan --preset smoke --out DIR [--set key=value ...] [--num-images N]
    python -m orchestrator.train reid --preset smoke --label-method lsro --num-gan N --gan-store DIR/generated

``gan`` trains one DCGAN and samples the generated-image store from it; ``reid`` trains and evaluates one re-ID
configuration. Both draw the synthetic dataset under ``--out`` when the config names it. Every input is checked
before Ray starts. A run with at most one worker trains in this process (as a sweep's trial does,
``orchestrator.resources``); ``--set reid.num_workers=N`` (N >= 2) starts a local Ray for a Train worker group.
Devices follow the config (``gan.use_gpu`` / ``reid.use_gpu``, as in a sweep): a visible GPU is not used unless
asked for. Each run is an MLflow run (tag ``mprl.kind=single``) in the sweep's store (``--tracking-uri``): the
config as params, the final metrics (ranking metrics in percent, tag ``mprl.metric_unit=percent``), the CMC plot
or the GAN's sample grid; a run folder used again (the same ``--name``, or the same GAN) is the same MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from orchestrator.config import LABEL_METHODS, PRESETS, Config, choices_help, config_hash, flat_dict, load_config
from orchestrator.config_checks import check_run_switch
from trainables.config import ReidInputs
from trainables.logs import configure_logging
from trainables.methods import method

KIND = "single"  # the runs' mprl.kind tag (a sweep's are sweep, stage, trial)


def gan_run_name(cfg: Config) -> str:
    """A deterministic run name from the dataset, the GAN fields the result depends on and the seeding scheme."""
    from trainables.gan.train import RESULT_FIELDS
    from trainables.seeding import STREAMS

    held = f"-v{cfg.reid.val_ids}" if cfg.reid.val_ids else ""
    from orchestrator.stages import same_data

    fields = ("dataset", *(f"gan.{k}" for k in RESULT_FIELDS))  # same_data: the GAN never sees the test sets
    return f"gan-{config_hash(same_data(cfg), *fields)}-s{STREAMS}{held}"


def store_name(cfg: Config) -> str:
    """The CLI's generated-store folder: ``generated`` for the running-statistics fixed-map rendering, else named by
    its rendering (a store rendered otherwise is never overwritten)."""
    gan = cfg.gan
    parts = (["bn_batch"] if gan.sample_bn == "batch" else []) + (["stretch"] if gan.save_stretch else [])
    return "-".join(["generated", *parts])


def run_gan(cfg: Config, out: Path, num_images: int, seed: int) -> int:
    from orchestrator import resources, tracking
    from orchestrator.stages import check_dataset, dataset_root
    from trainables.gan.sample import Rendering, generate
    from trainables.gan.train import SAMPLES_FILE, sample_grid_path, train_gan
    from trainables.runtime import device_for

    check_dataset(cfg.dataset)  # a bad dataset root fails before an MLflow run exists
    name = gan_run_name(cfg)
    params = {"generate.num_images": num_images, "generate.seed": seed}
    with _tracked(cfg, "gan", out / "runs" / name, name, params) as (client, run_id):
        root = dataset_root(cfg.dataset, out / "data")
        workers = resources.train_workers(cfg, "gan")
        with _ray_if(cfg, workers):
            t0 = time.perf_counter()
            gen_path = train_gan(cfg.gan, root, out / "runs", name, num_workers=workers, val_ids=cfg.reid.val_ids)
            t1 = time.perf_counter()
            store = generate(gen_path, out / store_name(cfg), num_images, seed=seed,
                             device=device_for(cfg.gan.use_gpu), render=Rendering.of(cfg.gan))
        grid = sample_grid_path(gen_path.parent)
        if grid is not None:
            shutil.copyfile(grid, out / SAMPLES_FILE)
            tracking.log_artifacts(client, run_id, [out / SAMPLES_FILE], "samples")
        seconds = {"train_seconds": round(t1 - t0, 1), "generate_seconds": round(time.perf_counter() - t1, 1)}
        tracking.log_metrics(client, run_id, {**seconds, "generated_images": store.n})
        client.set_tag(run_id, "mprl.generator", str(gen_path))
        print(f"training {seconds['train_seconds']:.1f} s, generation {seconds['generate_seconds']:.1f} s")
        print(f"generator: {gen_path}\nsamples:   {out / SAMPLES_FILE if grid else '-'}\n"
              f"generated: {store.root} ({store.n} images)")
    return 0


def run_reid(cfg: Config, out: Path, gan_store: str | None, smprl_labels: str | None, name: str | None) -> int:
    from orchestrator import resources, tracking
    from orchestrator.plots import plot_cmc
    from orchestrator.stages import check_dataset, dataset_root
    from orchestrator.trials import input_tags
    from trainables.config import PER_QUERY_AP, RANKED_LIST
    from trainables.reid.loop import run_spec, train_reid

    if method(cfg.labels.method).generated and cfg.labels.num_gan > 0 and not gan_store:
        raise ValueError(f"labels.method={cfg.labels.method!r} with labels.num_gan={cfg.labels.num_gan} needs "
                         f"--gan-store DIR (a generated-image store, e.g. from `orchestrator.train gan`)")
    check_dataset(cfg.dataset)  # a bad dataset root fails before an MLflow run exists
    name = name or f"reid-{cfg.labels.method}-{cfg.labels.num_gan}"
    store = gan_store and str(Path(gan_store).resolve())
    params = {"inputs.gan_store": store, "inputs.smprl_labels": smprl_labels}
    with _tracked(cfg, "reid", out / "runs" / name, name, params) as (client, run_id):
        inputs = ReidInputs(str(dataset_root(cfg.dataset, out / "data")), store, smprl_labels,
                            test_roots=cfg.dataset.test_root)  # the cross-domain test sets
        workers = resources.train_workers(cfg, "reid")
        with _ray_if(cfg, workers):
            res = train_reid(cfg.reid, cfg.labels, inputs, run_spec(cfg.reid, out / "runs", name, num_workers=workers))
        counts = {"epoch": res.epoch, "num_classes": res.num_classes, "num_gan": res.num_gan,
                  "num_train": res.num_train, "skipped_queries": res.skipped_queries}
        # fractions here: tracking.log_metrics logs the ranking metrics in percent (the run's TAG_UNIT says so)
        tracking.log_metrics(client, run_id, {**{f"final_{k}": v for k, v in res.metrics().items()}, **counts})
        run_dir = out / "runs" / name
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_cmc({name: res.cmc}, Path(tmp) / "cmc.png", title=name)
            tracking.log_artifacts(client, run_id, [png, run_dir / RANKED_LIST], "plots")
        tracking.log_artifacts(client, run_id, [run_dir / PER_QUERY_AP], "evaluation")
        for tag, value in input_tags(run_dir, inputs.data_root, cfg.dataset.test_root).items():  # for export
            client.set_tag(run_id, tag, value)
        print(f"final (%): rank-1 {100 * res.rank1:.2f}  rank-5 {100 * res.rank5:.2f}  rank-10 {100 * res.rank10:.2f}  "
              f"mAP {100 * res.mAP:.2f}  ({res.num_classes} ids, {res.num_gan} extra images)")  # MLflow's unit
    return 0


@contextlib.contextmanager
def _tracked(cfg: Config, stage: str, run_dir: Path, name: str, params: dict[str, Any]) -> Iterator[tuple[Any, str]]:
    """The run's MLflow run for the duration of the block: (client, run id), RUNNING with the config as params;
    FINISHED after it, FAILED with the error (KILLED on Ctrl+C) when it raises. The tracking store is checked
    before anything is drawn or trained."""
    from orchestrator import tracking

    storage = Path(cfg.cluster.storage_path)
    uri = cfg.cluster.tracking_uri or tracking.default_tracking_uri(storage)
    tracking.check_reachable(uri)
    storage.mkdir(parents=True, exist_ok=True)
    client, exp_id = tracking.setup(uri, cfg.cluster.experiment, storage)
    run_id, _ = tracking.get_or_create_run(client, exp_id, KIND, f"{stage}:{run_dir.resolve()}", name)
    if tracking.TAG_ERROR in client.get_run(run_id).data.tags:  # an earlier attempt's error: this one starts clean
        client.delete_tag(run_id, tracking.TAG_ERROR)
    tracking.set_status(client, run_id, "RUNNING")
    for tag, value in {"mprl.stage": stage, "mprl.run_dir": str(run_dir), tracking.TAG_UNIT: tracking.PERCENT}.items():
        client.set_tag(run_id, tag, value)
    tracking.log_params(client, run_id, {**flat_dict(cfg), **{k: v for k, v in params.items() if v is not None}})
    try:
        yield client, run_id
    except KeyboardInterrupt:
        tracking.set_status(client, run_id, "KILLED")
        raise
    except BaseException as err:
        tracking.fail(client, run_id, f"{type(err).__name__}: {err}")
        raise
    tracking.set_status(client, run_id, "FINISHED")
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else uri
    print(f"MLflow: experiment '{cfg.cluster.experiment}', run {run_id} ({name})\n  {ui}")


@contextlib.contextmanager
def _ray_if(cfg: Config, num_workers: int) -> Iterator[None]:
    """Ray (``cluster.connect``) for the duration of a run that uses a Train worker group (``num_workers >= 1``)."""
    if num_workers < 1:
        yield
        return
    import ray

    from orchestrator import cluster, resources

    cluster.check_address(cfg.cluster.address)
    cluster.connect(cfg)
    try:
        resources.check_resources(cfg)  # more workers than the cluster has: say so now, not after 900 s
        yield
    finally:
        ray.shutdown()


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    intro, _, rest = __doc__.replace("``", "").partition("\n\n")
    p = argparse.ArgumentParser(prog="python -m orchestrator.train", description=intro, formatter_class=raw,
                                epilog="examples:\n" + rest.strip("\n") + "\n\n" + choices_help())
    sub = p.add_subparsers(dest="stage", required=True, metavar="{gan,reid}",
                           help="the stage to run; `gan --help` / `reid --help` list its options (--preset "
                                "defaults to smoke here, cpu in the sweep)")
    gan = sub.add_parser("gan", help="train one DCGAN and generate images", formatter_class=raw,
                         description="Train one DCGAN, then sample the generated-image store from it.")
    reid = sub.add_parser("reid", help="train and evaluate one re-ID configuration", formatter_class=raw,
                          description="Train and evaluate one re-ID configuration.")
    for s in (gan, reid):
        s.add_argument("--preset", default="smoke", choices=PRESETS, metavar="NAME",
                       help=f"the config to start from: {', '.join(PRESETS)} (default: smoke; the sweep's is cpu)")
        s.add_argument("--config", metavar="FILE", help="YAML file of overrides, applied after the preset "
                                                        "(default: none)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field after --config, e.g. --set reid.epochs=5 (repeatable)")
        s.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI of the run (default: "
                                                             "cluster.tracking_uri, else sqlite:///<storage>/mlflow.db "
                                                             "as the sweep's; <storage> is cluster.storage_path)")
    gan.add_argument("--out", required=True, metavar="DIR", help="folder for data/ (synthetic), runs/ and generated/")
    gan.add_argument("--num-images", type=int, metavar="N", help="images to generate (default: labels.num_gan)")
    gan.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    reid.add_argument("--label-method", choices=LABEL_METHODS, metavar="METHOD",
                      help=f"labels.method: {', '.join(LABEL_METHODS)} (default: the preset's, lsro unless it sets "
                           f"one)")
    reid.add_argument("--num-gan", type=int, metavar="N",
                      help="labels.num_gan, generated images to train on (default: the preset's)")
    reid.add_argument("--gan-store", metavar="DIR",
                      help="generated-image store folder (from `orchestrator.train gan`: DIR/generated; default: none, "
                           "needed when the method trains on generated images)")
    reid.add_argument("--smprl-labels", metavar="NAME",
                      help="name of the static label file in the store (sMpRL; default: none)")
    reid.add_argument("--out", default="runs/reid", metavar="DIR",
                      help="where the run (checkpoints) and a synthetic dataset go (default: runs/reid)")
    reid.add_argument("--name", help="run name (default: reid-<method>-<num_gan>); reusing one resumes it")
    return p


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = _parser().parse_args(argv)
    extra = [f"cluster.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []
    if args.stage == "reid":
        extra += [f"labels.method={args.label_method}"] if args.label_method else []
        extra += [f"labels.num_gan={args.num_gan}"] if args.num_gan is not None else []
    try:
        cfg = load_config(args.preset, file=args.config, overrides=[*args.overrides, *extra])
        out = Path(args.out).expanduser().resolve()
        if args.stage == "gan":
            n = cfg.labels.num_gan if args.num_images is None else args.num_images
            return run_gan(cfg, out, n, args.seed)
        check_run_switch(cfg)
        return run_reid(cfg, out, args.gan_store, args.smprl_labels, args.name)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # run the imported module's main, so Ray pickles the loops by reference
    from orchestrator.train import main as _main

    sys.exit(_main())

