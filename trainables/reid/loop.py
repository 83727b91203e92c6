"""Re-ID training on real + labelled generated images: the per-worker loop and its driver.

``reid_loop`` is the per-worker loop run by :func:`trainables.runtime.fit` (a Ray Train worker group, or in this
process for a run spec with 0 workers). Per epoch it runs :func:`trainables.reid.engine.train_one_epoch` with the
step of the model kind, evaluates the validation split every ``reid.eval_every`` epochs and the test split after
the last one, and reports (metrics; rank 0's checkpoint). Optimizer: SGD with (Nesterov) momentum or AMSGrad
Adam, new layers at ``new_lr_mult`` x the backbone rate, an optional linear warm-up and one step decay. It reads
the ``reid`` and ``labels`` config sections only; ``python -m orchestrator.train reid --help`` runs one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datasets.decoded_cache import CacheDir, image_rows
from datasets.generated import GeneratedStore
from datasets.local_copy import local_dir
from datasets.market1501 import load
from datasets.records import Record, Split
from trainables import runtime
from trainables.config import METRICS, LabelsConfig, ReidConfig, ReidInputs, ReidResult, build, cache_size, to_dict
from trainables.faults import Injection
from trainables.methods import TWO_STREAM_WEIGHT_DECAY, method
from trainables.reid.data import EpochLoader, epoch_batches, train_loader
from trainables.reid.engine import StepFn, ident_step, pair_step, train_one_epoch
from trainables.reid.evaluate import check_rerank, evaluate_final, evaluate_model, load_test_sets
from trainables.reid.labels import LabelSpec, num_outputs, samples_generated, switch_epoch_for
from trainables.reid.models import build_reid_model, reference_code_init_
from trainables.reid.pairs import epoch_pairs, pair_rows, pos_fraction_for_epoch
from trainables.reid.weights import init_backbone
from trainables.seeding import STREAMS, Stream, check_streams, derive_seed, numpy_rng, seed_everything, validation_split

log = logging.getLogger(__name__)


def label_spec(reid: ReidConfig, labels: LabelsConfig, num_classes: int) -> LabelSpec:
    switch = labels.switch_at if labels.switch_at is not None else switch_epoch_for(reid.epochs, labels.switch_epoch)
    return LabelSpec(method=labels.method, num_classes=num_classes, order=labels.order, keep=labels.keep,
                     gen_weight=labels.gen_weight, switch_epoch=switch, before_switch=labels.before_switch,
                     real_smoothing=labels.real_smoothing, switch=labels.switch)


def weight_decay(reid: ReidConfig, labels: LabelsConfig) -> float:
    """``reid.weight_decay``, else the reference code's: the label method's for the identification net
    (trainables/methods.py), one value for every method of the two-stream net."""
    if reid.weight_decay is not None:
        return reid.weight_decay
    return TWO_STREAM_WEIGHT_DECAY if reid.model == "twostream" else method(labels.method).weight_decay


# ------------------------------------------------------------------------------------- the worker loop

@dataclass(frozen=True)
class RunData:
    """The records one run trains and evaluates on."""

    split: Split  # train: the real training images (relabelled 0..K-1); query/gallery: the test split
    val: Split | None  # held-out training identities (reid.val_ids), or None
    extra: tuple[Record, ...]  # after the real ones: labels.num_gan generated images, or real repeats
    static_ranks: np.ndarray | None  # uint16 [num_gan, K] stored ranks (static-rank methods only)

    @property
    def records(self) -> tuple[Record, ...]:
        return (*self.split.train, *self.extra)

    @property
    def evaluated(self) -> tuple[tuple[Record, ...], ...]:
        """The record lists that evaluation reads (test split, validation split)."""
        return (self.split.query, self.split.gallery, *((self.val.query, self.val.gallery) if self.val else ()))


def reid_loop(config: dict) -> ReidResult | None:
    """Per-worker training loop (run by :func:`trainables.runtime.fit`). Returns rank 0's result (other ranks None)."""
    reid, labels = build(ReidConfig, config["reid"], "reid."), build(LabelsConfig, config["labels"], "labels.")
    inputs, ctx = ReidInputs(**config["inputs"]), runtime.context()  # [1] rank, world size, device
    inject: Injection | None = config.get("inject")
    seed_everything(Stream.REID_INIT, reid.seed, ctx.rank)
    data = load_run_data(reid, labels, inputs)
    tests = load_test_sets(inputs.test_roots)  # the cross-domain test sets (dataset.test_root)
    for split, what in ((data.split, "test"), *((s, f"{name} test") for name, s in tests)):
        check_rerank(reid, split, what)  # fails now, not after the training (validation is never re-ranked)
    spec = label_spec(reid, labels, data.split.num_train_ids)
    model, optimizer, scheduler = build_training(reid, spec, weight_decay(reid, labels), ctx)
    start_epoch, final = _resume(model, optimizer, scheduler)  # [2] the latest checkpoint, if any
    step_fn, channels_last = _step(reid, spec, data.static_ranks, ctx)
    cache_dir = _cache_dir(reid, inputs, config["run_dir"])
    loader = _train_loader(reid, data, cache_dir, ctx)  # the run's one loader
    for epoch in range(start_epoch, reid.epochs):
        # Reseed per epoch: a run resumed from the epoch-(e-1) checkpoint replays epoch e exactly.
        seed_everything(Stream.REID_EPOCH, reid.seed, ctx.rank, epoch)
        _next_epoch(loader, reid, data, spec, epoch, ctx)
        hook = _step_hook(warmup_hook(optimizer, reid, epoch, len(loader)), inject, ctx.rank, epoch)
        metrics = train_one_epoch(model, loader, optimizer, step_fn, epoch=epoch, device=ctx.device,
                                  channels_last=channels_last, on_step=hook)
        scheduler.step()  # per epoch: the lr of the next epoch's first step
        metrics.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"])
        if ctx.rank == 0 and data.val is not None and _validates(reid, epoch):
            res = evaluate_model(runtime.unwrap(model), data.val, reid, ctx.device, cache_dir=cache_dir)
            metrics.update({f"val_{k}": res[k] for k in ("rank1", "mAP")})
        if ctx.rank == 0 and epoch == reid.epochs - 1:  # the test splits: the final model only
            final = evaluate_final(runtime.unwrap(model), data.split, tests, reid, ctx.device, cache_dir=cache_dir,
                                   run_dir=config["run_dir"])  # + re-ranked, cross-domain, the ranked list
            metrics.update({k: final[k] for k in (*METRICS, "mINP")})
            if reid.bn_recalibrate:  # the same model with BN statistics of the real training images only
                final["recalibrated"] = evaluate_recalibrated(runtime.unwrap(model), data, reid, ctx.device, cache_dir)
        _log_epoch(ctx.rank, epoch, reid.epochs, metrics)
        state = None
        if ctx.rank == 0:
            state = {"epoch": epoch, "model": runtime.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "final": final, "num_classes": spec.num_classes,
                     "num_outputs": num_outputs(spec), "reid": to_dict(reid), "labels": to_dict(labels),
                     "streams": STREAMS}
        runtime.report(metrics, state=state)  # [3] metrics every epoch, rank 0's checkpoint
    return _result(final, reid, data) if ctx.rank == 0 else None


def _result(final: dict, reid: ReidConfig, data: RunData) -> ReidResult:
    return ReidResult(**{k: final[k] for k in (*METRICS, "mINP", "skipped_queries")}, cmc=tuple(final["cmc"]),
                      epoch=reid.epochs - 1, num_classes=data.split.num_train_ids, num_gan=len(data.extra),
                      num_train=len(data.split.train), recalibrated=final.get("recalibrated"),
                      reranked=final.get("reranked"), cross_domain=final.get("cross_domain"))


def evaluate_recalibrated(model: torch.nn.Module, data: RunData, reid: ReidConfig, device: torch.device,
                          cache_dir: CacheDir | None) -> dict[str, float]:
    """The test metrics of ``model`` with its BatchNorm statistics re-estimated on the real training images (the
    test transform; ``trainables.reid.bn_recalibrate``)."""
    from trainables.reid.bn_recalibrate import recalibrated
    from trainables.reid.evaluate import eval_batches

    fixed = recalibrated(model, eval_batches(data.split.train, reid, device, cache_dir), device)
    res = evaluate_model(fixed, data.split, reid, device, cache_dir=cache_dir)
    return {k: res[k] for k in (*METRICS, "mINP")}


def _validates(reid: ReidConfig, epoch: int) -> bool:
    """Evaluate the validation split every ``reid.eval_every`` epochs and after the last."""
    return bool(reid.eval_every) and ((epoch + 1) % reid.eval_every == 0 or epoch == reid.epochs - 1)


def load_run_data(reid: ReidConfig, labels: LabelsConfig, inputs: ReidInputs) -> RunData:
    """The dataset (minus ``reid.val_ids`` held-out identities, the same for every seed), then the extra records:
    the first ``labels.num_gan`` generated images (with their static ranks), or real repeats."""
    split, val = validation_split(load(inputs.data_root), reid.val_ids)
    traits = method(labels.method)
    if not traits.extra_images or labels.num_gan == 0:
        return RunData(split, val, (), None)
    if traits.real_repeats:  # as many steps as num_gan generated images would add, real images
        rng = numpy_rng(Stream.MATCHED_REPEATS, reid.seed)
        train = split.train
        cycle = np.concatenate([rng.permutation(len(train)) for _ in range(-(-labels.num_gan // len(train)))])
        return RunData(split, val, tuple(train[i] for i in cycle[:labels.num_gan]), None)
    if not inputs.store_root:
        raise ValueError(f"labels.method={labels.method!r} with labels.num_gan={labels.num_gan} needs a "
                         f"generated-image store (run the generation stage or pass --gan-store)")
    store = GeneratedStore(inputs.store_root)
    gen = store.records(labels.num_gan)
    if not traits.static_ranks:
        return RunData(split, val, gen, None)
    found = store.read_labels(inputs.smprl_labels) if inputs.smprl_labels else None
    if found is None:
        raise ValueError(f"labels.method={labels.method!r} needs static labels in {store.root}/labels "
                         f"(name {inputs.smprl_labels!r}); run the sMpRL label stage first")
    return RunData(split, val, gen, found[0][: len(gen)])


def _step(reid: ReidConfig, spec: LabelSpec, static_ranks: np.ndarray | None,
          ctx: runtime.Context) -> tuple[StepFn, bool]:
    """The step function of ``reid.model`` (bf16 autocast on CUDA when ``reid.amp``), and whether batches go
    channels-last."""
    static = torch.from_numpy(static_ranks.astype(np.int64)).to(ctx.device) if static_ranks is not None else None
    cuda = ctx.device.type == "cuda"
    amp = reid.amp and cuda
    make_step = pair_step if reid.model == "twostream" else ident_step
    autocast = lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    return make_step(spec, static, autocast), reid.channels_last and cuda


def _step_hook(warm: Callable[[int], None] | None, inject: Injection | None, rank: int,
               epoch: int) -> Callable[[int], None] | None:
    """What runs before each optimizer step: the warm-up's lr, and the fault-injection test hook."""
    if warm is None and inject is None:
        return None

    def hook(step: int) -> None:
        if inject is not None:
            inject.maybe_fail(rank, epoch, step)
        if warm is not None:
            warm(step)

    return hook


def build_model(reid: ReidConfig, num_outputs: int, *, device_type: str = "cpu",
                pretrained: bool = True) -> torch.nn.Module:
    """The re-ID network of ``reid`` (the one place its fields become the model's arguments), with the backbone
    weights ``reid.pretrained`` names (``pretrained=False``: random, e.g. for a checkpoint's weights to follow),
    channels-last on CUDA."""
    model = build_reid_model(reid.model, num_outputs, backbone=reid.backbone, embed_dim=reid.embed_dim,
                             dropout=reid.dropout, last_stride=reid.last_stride)
    if reid.lr_scheme == "reference_code":
        reference_code_init_(model)
    if pretrained:
        init_backbone(model, reid.backbone, reid.pretrained)
    if device_type == "cuda" and reid.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_training(reid: ReidConfig, spec: LabelSpec, wd: float, ctx: runtime.Context):
    """Model (on the worker's device, DDP-wrapped on a group), SGD or Adam with two lr groups, step decay."""
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    model = build_model(reid, num_outputs(spec), device_type=ctx.device.type)
    groups = model.param_groups(reid.lr, new_lr_mult=reid.new_lr_mult, weight_decay=wd, scheme=reid.lr_scheme)
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
    check_streams(state, "re-ID")
    runtime.unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # a pure function of the epoch; checkpoints written by the earlier StepLR lack the lambdas' entry
    scheduler.load_state_dict({"lr_lambdas": [None] * len(optimizer.param_groups), **state["scheduler"]})
    log.info("resuming re-ID training after epoch %d", state["epoch"])
    return state["epoch"] + 1, dict(state.get("final", {}))


def _cache_dir(reid: ReidConfig, inputs: ReidInputs, run_dir: str) -> CacheDir | None:
    """Where the decoded-image cache is (None: ``reid.decoded_cache`` is off, images are read from their files).

    A sweep's folder (``inputs.cache_dir``) was filled and checked by its decode stages: trusted, no stat per image
    (``datasets.decoded_cache``). A single run's own folder is filled in-process, each image's file checked.
    Either is read from node-local copies with ``reid.local_cache_dir`` (or ``$MPRL_LOCAL_CACHE``)."""
    if not reid.decoded_cache:
        return None
    here = local_dir(reid.local_cache_dir)
    if inputs.cache_dir:
        return CacheDir(inputs.cache_dir, trusted=True, local_dir=here)
    return CacheDir(str(Path(run_dir).parent / "decoded"), local_dir=here)


def _train_loader(reid: ReidConfig, data: RunData, cache_dir: CacheDir | None, ctx: runtime.Context) -> EpochLoader:
    """The run's one training loader. With the decoded cache, images it lacks are decoded into it first, on rank 0
    also those that evaluation reads: no image file is opened after this. Without it, the loader workers decode
    each image from its file on every read."""
    size = cache_size(reid.image_size, reid.augment)
    rows = image_rows(data.records, size, cache_dir, workers=reid.loader_workers)
    for part in data.evaluated if cache_dir and ctx.rank == 0 else ():
        if part:
            image_rows(part, size, cache_dir, workers=reid.loader_workers)
    return train_loader(data.records, rows, reid.image_size, device=ctx.device, workers=reid.loader_workers,
                        augment=reid.augment, pairs=reid.model == "twostream")


def _next_epoch(loader: EpochLoader, reid: ReidConfig, data: RunData, spec: LabelSpec, epoch: int,
                ctx: runtime.Context) -> None:
    """Give ``loader`` this epoch's batches (this rank's share; pair rows for the two-stream net) and reseed its
    augmentation."""
    n_gen = len(data.extra) if samples_generated(spec, epoch) else 0
    augment = derive_seed(Stream.REID_AUGMENT, reid.seed, ctx.rank, epoch)
    if reid.model == "twostream":
        pair_batch = max(2, reid.batch_size // 2)  # pairs per step (the paper: 32)
        pos = reid.pos_fraction
        if pos is None:  # the reference's schedule, with its per-batch rounding
            pos = pos_fraction_for_epoch(epoch, batch_size=pair_batch)
        labels = np.array([rec.label for rec in data.split.train])
        pairs = epoch_pairs(labels, n_gen, pos_fraction=pos, rng=numpy_rng(Stream.PAIRS, reid.seed, epoch))
        batches = epoch_batches(len(pairs), 0, pair_batch, gen_fraction=None,
                                rng=numpy_rng(Stream.PAIR_BATCHES, reid.seed, epoch), rank=ctx.rank,
                                world_size=ctx.world_size)[:reid.max_steps]
        loader.epoch(pair_rows(pairs, batches), augment)
        return
    batches = epoch_batches(len(data.split.train), n_gen, reid.batch_size, gen_fraction=reid.gen_fraction,
                            rng=numpy_rng(Stream.REID_BATCHES, reid.seed, epoch), rank=ctx.rank,
                            world_size=ctx.world_size)[:reid.max_steps]
    loader.epoch(batches, augment)


def _log_epoch(rank: int, epoch: int, epochs: int, m: dict) -> None:
    if rank != 0:
        return
    evald = f"  val rank-1 {m['val_rank1']:.3f}  val mAP {m['val_mAP']:.3f}" if "val_rank1" in m else ""
    evald += f"  test rank-1 {m['rank1']:.3f}  test mAP {m['mAP']:.3f}" if "rank1" in m else ""
    print(f"[reid] epoch {epoch + 1}/{epochs}  loss {m['loss']:.4f}  acc {m['train_acc']:.3f}  "
          f"{m['images_per_s']:.0f} img/s{evald}", flush=True)


# ------------------------------------------------------------------------------------- driver

def train_reid(reid: ReidConfig, labels: LabelsConfig, inputs: ReidInputs, run: runtime.RunSpec, *,
               inject_failure: str | None = None) -> ReidResult:
    """Run one re-ID training as ``run`` says (a Ray Train worker group, or in-process for 0 workers).

    ``inject_failure`` (default: the ``MPRL_INJECT_FAILURE`` environment variable) is the fault-injection
    test hook (:class:`trainables.faults.FailurePlan`); a malformed spec fails here, on the driver.
    """
    inject = Injection.from_spec(inject_failure, run.run_dir, run.name)
    config = {"reid": to_dict(reid), "labels": to_dict(labels), "inputs": asdict(inputs), "inject": inject,
              "run_dir": str(run.run_dir)}
    return runtime.fit(reid_loop, config, run)


def run_spec(reid: ReidConfig, run_parent: str | Path, name: str, *, num_workers: int, report_to_tune: bool = False,
             max_failures: int = 0) -> runtime.RunSpec:
    """Where and how a re-ID run executes: ``num_workers`` Ray Train workers (0 = in this process; the orchestrator
    decides: ``orchestrator.resources.train_workers``), on GPUs when ``reid.use_gpu``."""
    return runtime.RunSpec(name=name, storage_path=str(run_parent), num_workers=num_workers, use_gpu=reid.use_gpu,
                           max_failures=max_failures, report_to_tune=report_to_tune)


def load_trained(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a run's latest checkpoint (eval mode, CPU) and return it with the checkpoint state."""
    ckpt = runtime.latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}")
    state = torch.load(Path(ckpt) / runtime.STATE_FILE, map_location="cpu", weights_only=False)
    reid = build(ReidConfig, state["reid"] if "reid" in state else state["config"]["reid"], "reid.")
    model = build_model(reid, state["num_outputs"], pretrained=False)  # the checkpoint's weights follow
    model.load_state_dict(state["model"])
    return model.eval(), state
