"""``python -m orchestrator.train gan|reid``: one stage alone, outside a sweep (presets and overrides as the sweep).

    python -m orchestrator.train gan --preset smoke --out DIR [--set key=value ...] [--num-images N]
    python -m orchestrator.train reid --preset smoke --label-method lsro --num-gan N --gan-store DIR/generated

``gan`` trains one DCGAN and samples the generated-image store from it; ``reid`` trains and evaluates one re-ID
configuration. Both draw the synthetic dataset under ``--out`` when the config names it. Every input is checked
before Ray starts. A run with at most one worker trains in this process (as a sweep's trial does,
``orchestrator.resources``); ``--set reid.num_workers=N`` (N >= 2) starts a local Ray for a Train worker group.
Devices follow the config (``gan.use_gpu`` / ``reid.use_gpu``, as in a sweep): a visible GPU is not used unless
asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import ray

from orchestrator import cluster, resources
from orchestrator.config import LABEL_METHODS, PRESETS, Config, choices_help, config_hash, load_config
from orchestrator.stages import dataset_root
from trainables.config import ReidInputs
from trainables.logs import configure_logging
from trainables.methods import method
from trainables.seeding import STREAMS


def gan_run_name(cfg: Config) -> str:
    """A deterministic run name from the dataset, the GAN fields the result depends on and the seeding scheme."""
    from trainables.gan.train import RESULT_FIELDS

    held = f"-v{cfg.reid.val_ids}" if cfg.reid.val_ids else ""
    return f"gan-{config_hash(cfg, 'dataset', *(f'gan.{k}' for k in RESULT_FIELDS))}-s{STREAMS}{held}"


def store_name(cfg: Config) -> str:
    """The CLI's generated-store folder: ``generated`` for the running-statistics fixed-map rendering, else named by
    its rendering (a store rendered otherwise is never overwritten)."""
    gan = cfg.gan
    parts = (["bn_batch"] if gan.sample_bn == "batch" else []) + (["stretch"] if gan.save_stretch else [])
    return "-".join(["generated", *parts])


def run_gan(cfg: Config, out: Path, num_images: int, seed: int) -> int:
    from trainables.gan.sample import Rendering, generate
    from trainables.gan.train import SAMPLES_FILE, sample_grid_path, train_gan
    from trainables.runtime import device_for

    root = dataset_root(cfg.dataset, out / "data")
    workers = resources.train_workers(cfg, "gan")
    with _ray_if(cfg, workers):
        t0 = time.perf_counter()
        gen_path = train_gan(cfg.gan, root, out / "runs", gan_run_name(cfg), num_workers=workers,
                             val_ids=cfg.reid.val_ids)
        t1 = time.perf_counter()
        store = generate(gen_path, out / store_name(cfg), num_images, seed=seed, device=device_for(cfg.gan.use_gpu),
                         render=Rendering.of(cfg.gan))
    grid = sample_grid_path(gen_path.parent)
    if grid is not None:
        shutil.copyfile(grid, out / SAMPLES_FILE)
    print(f"training {t1 - t0:.1f} s, generation {time.perf_counter() - t1:.1f} s")
    print(f"generator: {gen_path}\nsamples:   {out / SAMPLES_FILE if grid else '-'}\n"
          f"generated: {store.root} ({store.n} images)")
    return 0


def run_reid(cfg: Config, out: Path, gan_store: str | None, smprl_labels: str | None, name: str | None) -> int:
    from trainables.reid.loop import run_spec, train_reid

    if method(cfg.labels.method).generated and cfg.labels.num_gan > 0 and not gan_store:
        raise ValueError(f"labels.method={cfg.labels.method!r} with labels.num_gan={cfg.labels.num_gan} needs "
                         f"--gan-store DIR (a generated-image store, e.g. from `orchestrator.train gan`)")
    inputs = ReidInputs(str(dataset_root(cfg.dataset, out / "data")),
                        gan_store and str(Path(gan_store).resolve()), smprl_labels)
    name = name or f"reid-{cfg.labels.method}-{cfg.labels.num_gan}"
    workers = resources.train_workers(cfg, "reid")
    with _ray_if(cfg, workers):
        res = train_reid(cfg.reid, cfg.labels, inputs, run_spec(cfg.reid, out / "runs", name, num_workers=workers))
    print(f"final: rank-1 {res.rank1:.4f}  rank-5 {res.rank5:.4f}  rank-10 {res.rank10:.4f}  "
          f"mAP {res.mAP:.4f}  ({res.num_classes} ids, {res.num_gan} extra images)")
    return 0


@contextlib.contextmanager
def _ray_if(cfg: Config, num_workers: int) -> Iterator[None]:
    """Ray (``cluster.connect``) for the duration of a run that uses a Train worker group (``num_workers >= 1``)."""
    if num_workers < 1:
        yield
        return

    cluster.check_address(cfg.cluster.address)
    cluster.connect(cfg)
    try:
        resources.check_resources(cfg)  # more workers than the cluster has: say so now, not after 900 s
        yield
    finally:
        ray.shutdown()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\n" + choices_help())
    sub = p.add_subparsers(dest="stage", required=True)
    gan = sub.add_parser("gan", help="train one DCGAN and generate images")
    reid = sub.add_parser("reid", help="train and evaluate one re-ID configuration")
    for s in (gan, reid):
        s.add_argument("--preset", default="smoke", choices=PRESETS, help="default smoke (the sweep's is cpu)")
        s.add_argument("--config", help="YAML file of overrides")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    gan.add_argument("--out", required=True, help="folder for data/ (synthetic), runs/ and generated/")
    gan.add_argument("--num-images", type=int, help="images to generate (default labels.num_gan)")
    gan.add_argument("--seed", type=int, default=0, help="generation seed")
    reid.add_argument("--label-method", choices=LABEL_METHODS)
    reid.add_argument("--num-gan", type=int)
    reid.add_argument("--gan-store", help="generated-image store folder (from the generation stage)")
    reid.add_argument("--smprl-labels", help="name of the static label file in the store (sMpRL)")
    reid.add_argument("--out", default="runs/reid", help="where the run (checkpoints) and a synthetic dataset go")
    reid.add_argument("--name", help="run name (default from the method); reusing one resumes it")
    return p


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = _parser().parse_args(argv)
    extra = []
    if args.stage == "reid":
        extra += [f"labels.method={args.label_method}"] if args.label_method else []
        extra += [f"labels.num_gan={args.num_gan}"] if args.num_gan is not None else []
    try:
        cfg = load_config(args.preset, file=args.config, overrides=[*args.overrides, *extra])
        out = Path(args.out).expanduser().resolve()
        if args.stage == "gan":
            n = cfg.labels.num_gan if args.num_images is None else args.num_images
            return run_gan(cfg, out, n, args.seed)
        return run_reid(cfg, out, args.gan_store, args.smprl_labels, args.name)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # run the imported module's main, so Ray pickles the loops by reference
    from orchestrator.train import main as _main

    sys.exit(_main())

