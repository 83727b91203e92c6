"""Re-ID training on real + labelled generated images: the per-worker loop and its driver.

``reid_loop`` is the per-worker loop run by :func:`trainables.runtime.fit` (a Ray Train worker group, or
in-process when ``reid.num_workers == 0``); it runs :func:`trainables.engine.train_one_epoch` with the step of
the model kind. SGD with (Nesterov) momentum, new layers at ``new_lr_mult`` x the backbone rate, one step
decay. It reads the ``reid`` and ``labels`` config sections only. The command line for a single run lives with
the presets: ``python -m orchestrator.train reid --help``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from datasets.decoded_cache import decoded_rows
from datasets.generated import GeneratedStore
from datasets.market1501 import load
from datasets.records import Record, hold_out
from trainables import runtime
from trainables.augment import cache_size
from trainables.config import LabelsConfig, ReidConfig, build, to_dict
from trainables.engine import ident_step, pair_step, train_one_epoch
from trainables.evaluation import evaluate_model
from trainables.labels import LabelSpec, num_outputs, samples_generated, switch_epoch_for
from trainables.models import build_reid_model
from trainables.pairs import pos_fraction_for_epoch
from trainables.reid_data import (
    EpochLoader,
    decoded_train_loader,
    epoch_batches,
    epoch_pairs,
    pair_loader,
    pair_rows,
    train_loader,
)
from trainables.seeding import seed_everything

log = logging.getLogger(__name__)
METRICS = ("rank1", "rank5", "rank10", "mAP")  # fractions in [0, 1]; shared with Tune and MLflow


@dataclass(frozen=True)
class ReidInputs:
    """What a run reads besides the config: the dataset, the generated store and the static labels' name."""

    data_root: str
    store_root: str | None = None
    smprl_labels: str | None = None  # name of the label file in the store (sMpRL only)
    # the decoded-image cache folder (the decode stages' output); None: ``decoded`` beside the run's folder,
    # filled in-process on first use
    cache_dir: str | None = None


def label_spec(reid: ReidConfig, labels: LabelsConfig, num_classes: int) -> LabelSpec:
    switch = labels.switch_at if labels.switch_at is not None else switch_epoch_for(reid.epochs, labels.switch_epoch)
    return LabelSpec(method=labels.method, num_classes=num_classes, order=labels.order, keep=labels.keep,
                     gen_weight=labels.gen_weight, switch_epoch=switch, before_switch=labels.before_switch,
                     real_smoothing=labels.real_smoothing)


def weight_decay(reid: ReidConfig, labels: LabelsConfig) -> float:
    """Reference code: 5e-4 for dMpRL-I/II and one-hot pseudo (LSRO's pseudo-label script), 1e-4 otherwise
    (baseline, All-in-one, LSRO, sMpRL), unless ``reid.weight_decay`` is set."""
    if reid.weight_decay is not None:
        return reid.weight_decay
    return 5e-4 if labels.method in ("dmprl1", "dmprl2", "pseudo") else 1e-4


# ------------------------------------------------------------------------------------- the worker loop

def reid_loop(config: dict) -> dict[str, Any]:
    """Per-worker training loop (run by :func:`trainables.runtime.fit`). Returns rank 0's final metrics."""
    reid, labels = build(ReidConfig, config["reid"], "reid."), build(LabelsConfig, config["labels"], "labels.")
    inputs, ctx = ReidInputs(**config["inputs"]), runtime.context()  # [1] rank, world size, device
    seed_everything(reid.seed, ctx.rank)
    split, val = load(inputs.data_root), None
    if reid.val_ids:
        split, val = hold_out(split, reid.val_ids)  # the same identities for every seed
    gen, static_ranks = _generated(labels, inputs, split.train, reid.seed)
    records, num_classes = (*split.train, *gen), split.num_train_ids
    spec = label_spec(reid, labels, num_classes)
    model, optimizer, scheduler = build_training(reid, spec, weight_decay(reid, labels), ctx)
    start_epoch, final = _resume(model, optimizer, scheduler)  # [2] the latest checkpoint, if any
    static = torch.from_numpy(static_ranks.astype(np.int64)).to(ctx.device) if static_ranks is not None else None
    cuda = ctx.device.type == "cuda"
    amp, channels_last = reid.amp and cuda, reid.channels_last and cuda
    make_step = pair_step if reid.model == "twostream" else ident_step
    step_fn = make_step(spec, static, lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp))
    plan = runtime.FailurePlan.parse(config["inject_failure"]) if config.get("inject_failure") else None
    cache_dir = _cache_dir(reid, inputs, config["run_dir"])
    evaluated = (split.query, split.gallery, *((val.query, val.gallery) if val else ()))
    persistent = _decoded_loader(reid, records, evaluated, cache_dir, ctx) if cache_dir else None  # every epoch's
    for epoch in range(start_epoch, reid.epochs):
        # Reseed per epoch: a run resumed from the epoch-(e-1) checkpoint replays epoch e exactly.
        seed_everything(reid.seed, ctx.rank, epoch)
        loader = _epoch_loader(reid, split.train, records, len(gen), spec, epoch, ctx, persistent)
        warm = warmup_hook(optimizer, reid, epoch, len(loader))

        def hook(step: int, e: int = epoch, warm=warm) -> None:
            if plan:
                plan.maybe_fail(config["run_dir"], config["run_name"], ctx.rank, e, step)
            if warm:
                warm(step)

        metrics = train_one_epoch(model, loader, optimizer, step_fn, epoch=epoch, device=ctx.device,
                                  channels_last=channels_last, on_step=hook if plan or warm else None)
        scheduler.step()  # per epoch: the lr of the next epoch's first step
        metrics.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"])
        if ctx.rank == 0 and val is not None and _validates(reid, epoch):
            res = evaluate_model(runtime.unwrap(model), val, reid, ctx.device, cache_dir=cache_dir)
            metrics.update({f"val_{k}": res[k] for k in ("rank1", "mAP")})
        if ctx.rank == 0 and epoch == reid.epochs - 1:  # the test split: the final model only
            final = evaluate_model(runtime.unwrap(model), split, reid, ctx.device, cache_dir=cache_dir)
            metrics.update({k: final[k] for k in (*METRICS, "mINP")})
        _log_epoch(ctx.rank, epoch, reid.epochs, metrics)
        state = None
        if ctx.rank == 0:
            state = {"epoch": epoch, "model": runtime.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "final": final, "num_classes": num_classes,
                     "num_outputs": num_outputs(spec), "reid": to_dict(reid), "labels": to_dict(labels)}
        runtime.report(metrics, state=state)  # [3] metrics every epoch, rank 0's checkpoint
    return {**final, "epoch": reid.epochs - 1, "num_classes": num_classes, "num_gan": len(gen),
            "num_train": len(split.train)}


def _validates(reid: ReidConfig, epoch: int) -> bool:
    """Evaluate the validation split every ``reid.eval_every`` epochs and after the last."""
    return bool(reid.eval_every) and ((epoch + 1) % reid.eval_every == 0 or epoch == reid.epochs - 1)


def _generated(labels: LabelsConfig, inputs: ReidInputs, train: tuple[Record, ...],
               seed: int) -> tuple[tuple[Record, ...], np.ndarray | None]:
    """The records after the real ones (generated images, or real repeats for baseline_matched) and static ranks."""
    if labels.method == "baseline" or labels.num_gan == 0:
        return (), None
    if labels.method == "baseline_matched":  # as many steps as num_gan generated images would add, real images
        rng = np.random.default_rng([seed, 17])
        cycle = np.concatenate([rng.permutation(len(train)) for _ in range(-(-labels.num_gan // len(train)))])
        return tuple(train[i] for i in cycle[:labels.num_gan]), None
    if not inputs.store_root:
        raise ValueError(f"labels.method={labels.method!r} with labels.num_gan={labels.num_gan} needs a "
                         f"generated-image store (run the generation stage or pass --gan-store)")
    store = GeneratedStore(inputs.store_root)
    gen = store.records(labels.num_gan)
    if labels.method != "smprl":
        return gen, None
    found = store.read_labels(inputs.smprl_labels) if inputs.smprl_labels else None
    if found is None:
        raise ValueError(f"labels.method='smprl' needs static labels in {store.root}/labels "
                         f"(name {inputs.smprl_labels!r}); run the sMpRL label stage first")
    return gen, found[0][: len(gen)]


def build_model(reid: ReidConfig, num_outputs: int, *, device_type: str = "cpu") -> torch.nn.Module:
    """The re-ID network of ``reid`` (ImageNet weights from ``reid.pretrained``), channels-last on CUDA."""
    return build_reid_model(reid.model, num_outputs, reid.backbone, reid.embed_dim, reid.dropout,
                            pretrained=reid.pretrained, last_stride=reid.last_stride,
                            channels_last=device_type == "cuda" and reid.channels_last)


def build_training(reid: ReidConfig, spec: LabelSpec, wd: float, ctx: runtime.Context):
    """Model (on the worker's device, DDP-wrapped on a group), SGD or Adam with two lr groups, step decay."""
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    model = build_model(reid, num_outputs(spec), device_type=ctx.device.type)
    groups = model.param_groups(reid.lr, new_lr_mult=reid.new_lr_mult, weight_decay=wd)
    model = runtime.wrap_model(model, find_unused_parameters=reid.model == "twostream")
    optimizer = make_optimizer(reid, groups)
    return model, optimizer, lr_schedule(optimizer, reid)


def make_optimizer(reid: ReidConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """``reid.optimizer`` over the lr groups: SGD with (Nesterov) momentum, or AMSGrad Adam with L2 decay."""
    if reid.optimizer == "adam":
        return torch.optim.Adam(groups, lr=reid.lr, amsgrad=True)
    return torch.optim.SGD(groups, lr=reid.lr, momentum=reid.momentum, nesterov=reid.nesterov)


def lr_factor(reid: ReidConfig, progress: float) -> float:
    """The lr multiplier after ``progress`` epochs of training (fractional within an epoch).

    Linear warm-up from ``warmup_factor`` to 1 over the first ``warmup_epochs`` (fast-reid's WarmupLR, in
    epochs), times ``lr_gamma`` per ``lr_step_epoch`` (else ``lr_step`` x epochs) epochs done (torch StepLR).
    """
    step = reid.lr_step_epoch or max(1, round(reid.lr_step * reid.epochs))
    decay = reid.lr_gamma ** (int(progress) // step)
    if progress >= reid.warmup_epochs:
        return decay
    return decay * (reid.warmup_factor + (1 - reid.warmup_factor) * progress / reid.warmup_epochs)


def lr_schedule(optimizer: torch.optim.Optimizer, reid: ReidConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch: lr x :func:`lr_factor` at the epoch's start (one step decay; the warm-up's start
    of each epoch). Within warm-up epochs :func:`warmup_hook` sets it per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(reid, epoch))


def warmup_hook(optimizer: torch.optim.Optimizer, reid: ReidConfig, epoch: int,
                steps: int) -> Callable[[int], None] | None:
    """Before optimizer step ``k`` of the ``steps`` of a warm-up epoch: lr = initial lr x lr_factor(epoch + k/steps).

    Stateless (the epoch's scheduler step overwrites it), so a run resumed from a checkpoint replays it exactly.
    None outside the warm-up.
    """
    if epoch >= reid.warmup_epochs or steps < 1:
        return None

    def warm(step: int) -> None:
        factor = lr_factor(reid, epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    return warm


def _resume(model, optimizer, scheduler) -> tuple[int, dict]:
    """(first epoch to train, last evaluation's metrics) from the latest checkpoint."""
    state = runtime.load_state()
    if state is None:
        return 0, {}
    runtime.unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # a pure function of the epoch; checkpoints written by the earlier StepLR lack the lambdas' entry
    scheduler.load_state_dict({"lr_lambdas": [None] * len(optimizer.param_groups), **state["scheduler"]})
    log.info("resuming re-ID training after epoch %d", state["epoch"])
    return state["epoch"] + 1, dict(state.get("final", {}))


def _cache_dir(reid: ReidConfig, inputs: ReidInputs, run_dir: str) -> str | None:
    """Where the decoded-image cache is (None: ``reid.decoded_cache`` is off, images are read from their files)."""
    if not reid.decoded_cache:
        return None
    return inputs.cache_dir or str(Path(run_dir).parent / "decoded")


def _decoded_loader(reid: ReidConfig, records: tuple[Record, ...], evaluated: tuple[tuple[Record, ...], ...],
                    cache_dir: str, ctx: runtime.Context) -> EpochLoader:
    """The run's one training loader over the decoded cache. Images it lacks are decoded into it first, on rank 0
    also those of the ``evaluated`` record lists: no image file is opened after this."""
    size = cache_size(reid.image_size, reid.augment)
    rows = decoded_rows(records, size, cache_dir, workers=reid.loader_workers)
    for part in evaluated if ctx.rank == 0 else ():
        if part:
            decoded_rows(part, size, cache_dir, workers=reid.loader_workers)
    return decoded_train_loader(records, rows, reid.image_size, device=ctx.device, workers=reid.loader_workers,
                                augment=reid.augment, pairs=reid.model == "twostream")


def _epoch_loader(reid: ReidConfig, train: tuple[Record, ...], records: tuple[Record, ...], n_gen: int,
                  spec: LabelSpec, epoch: int, ctx: runtime.Context, persistent: EpochLoader | None = None):
    """This epoch's batches: on ``persistent`` (the decoded cache) or a new JPEG DataLoader."""
    n_gen_epoch = n_gen if samples_generated(spec, epoch) else 0
    pin = ctx.device.type == "cuda"
    seed = reid.seed * 1000
    if reid.model == "twostream":
        labels = np.array([rec.label for rec in train])
        pair_batch = max(2, reid.batch_size // 2)  # pairs per step (the paper: 32)
        pos = reid.pos_fraction
        if pos is None:  # the reference's schedule, with its per-batch rounding
            pos = pos_fraction_for_epoch(epoch, batch_size=pair_batch)
        pairs = epoch_pairs(labels, n_gen_epoch, pos_fraction=pos, seed=seed, epoch=epoch)
        batches = epoch_batches(len(pairs), 0, pair_batch, gen_fraction=None, seed=seed + 1,
                                epoch=epoch, rank=ctx.rank, world_size=ctx.world_size)[:reid.max_steps]
        if persistent is not None:
            return persistent.epoch(pair_rows(pairs, batches), reid.seed, ctx.rank, epoch)
        return pair_loader(records, pairs, batches, reid.image_size, workers=reid.loader_workers, pin_memory=pin,
                           augment=reid.augment)
    batches = epoch_batches(len(train), n_gen_epoch, reid.batch_size, gen_fraction=reid.gen_fraction, seed=seed,
                            epoch=epoch, rank=ctx.rank, world_size=ctx.world_size)[:reid.max_steps]
    if persistent is not None:
        return persistent.epoch(batches, reid.seed, ctx.rank, epoch)
    return train_loader(records, batches, reid.image_size, workers=reid.loader_workers, pin_memory=pin,
                        augment=reid.augment)


def _log_epoch(rank: int, epoch: int, epochs: int, m: dict) -> None:
    if rank != 0:
        return
    evald = f"  val rank-1 {m['val_rank1']:.3f}  val mAP {m['val_mAP']:.3f}" if "val_rank1" in m else ""
    evald += f"  test rank-1 {m['rank1']:.3f}  test mAP {m['mAP']:.3f}" if "rank1" in m else ""
    print(f"[reid] epoch {epoch + 1}/{epochs}  loss {m['loss']:.4f}  acc {m['train_acc']:.3f}  "
          f"{m['images_per_s']:.0f} img/s{evald}", flush=True)


# ------------------------------------------------------------------------------------- driver

def train_reid(reid: ReidConfig, labels: LabelsConfig, inputs: ReidInputs, run: runtime.RunSpec, *,
               inject_failure: str | None = None) -> dict[str, Any]:
    """Run one re-ID training as ``run`` says (a Ray Train worker group, or in-process for 0 workers).

    ``inject_failure`` (default: the ``MPRL_INJECT_FAILURE`` environment variable) is the fault-injection
    hook of :class:`trainables.runtime.FailurePlan`, for reliability tests.
    """
    inject = inject_failure if inject_failure is not None else os.environ.get(runtime.FAILURE_ENV)
    if inject:
        runtime.FailurePlan.parse(inject)  # a malformed spec fails here, on the driver
    config = {"reid": to_dict(reid), "labels": to_dict(labels), "inputs": asdict(inputs),
              "inject_failure": inject, "run_dir": str(run.run_dir), "run_name": run.name}
    return runtime.fit(reid_loop, config, run)


def run_spec(reid: ReidConfig, run_parent: str | Path, name: str, *, report_to_tune: bool = False,
             max_failures: int = 0) -> runtime.RunSpec:
    """Where and how a re-ID run executes: ``reid.num_workers`` workers (0 = in-process), GPUs if configured."""
    return runtime.RunSpec(name=name, storage_path=str(run_parent), num_workers=reid.num_workers,
                           use_gpu=reid.use_gpu, max_failures=max_failures, report_to_tune=report_to_tune)


def load_trained(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a run's latest checkpoint (eval mode, CPU) and return it with the checkpoint state."""
    ckpt = runtime.latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}")
    state = torch.load(Path(ckpt) / runtime.STATE_FILE, map_location="cpu", weights_only=False)
    reid = build(ReidConfig, state["reid"] if "reid" in state else state["config"]["reid"], "reid.")
    model = build_reid_model(reid.model, state["num_outputs"], reid.backbone, reid.embed_dim, reid.dropout,
                             "random", last_stride=reid.last_stride)  # the checkpoint's weights follow
    model.load_state_dict(state["model"])
    return model.eval(), state
