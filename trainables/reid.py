"""Re-ID training on real + labelled generated images: the per-worker loop, its driver and a CLI.

Every image goes through one soft-target cross entropy (TIP Eq. 11) with its target from
:func:`trainables.labels.targets_for`; dynamic (dMpRL, pseudo) targets come from the detached logits of the same
forward pass. SGD with (Nesterov) momentum, new layers at ``new_lr_mult`` x the backbone rate, one step decay.

    python -m trainables.reid --preset smoke --label-method lsro --num-gan N --gan-store DIR
"""

from __future__ import annotations

import logging
import sys
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from datasets.generated import GeneratedStore
from datasets.market1501 import load
from datasets.records import Record
from orchestrator.config import Config, from_dict, to_dict
from trainables import runtime
from trainables.labels import LabelSpec, num_outputs, samples_generated, soft_cross_entropy, switch_epoch_for, \
    targets_for
from trainables.models import build_reid_model, two_stream_loss
from trainables.pairs import pos_fraction_for_epoch
from trainables.reid_data import epoch_batches, epoch_pairs, pair_loader, to_device, train_loader
from trainables.reid_eval import evaluate_model

log = logging.getLogger(__name__)
METRICS = ("rank1", "rank5", "rank10", "mAP")  # fractions in [0, 1]; shared with Tune and MLflow


@dataclass(frozen=True)
class ReidInputs:
    """What a run reads besides the config: the dataset, the generated store and the static labels' name."""

    data_root: str
    store_root: str | None = None
    smprl_labels: str | None = None  # name of the label file in the store (sMpRL only)


def label_spec(cfg: Config, num_classes: int) -> LabelSpec:
    lab = cfg.labels
    return LabelSpec(method=lab.method, num_classes=num_classes, order=lab.order, keep=lab.keep,
                     gen_weight=lab.gen_weight, switch_epoch=switch_epoch_for(cfg.reid.epochs, lab.switch_epoch),
                     before_switch=lab.before_switch, real_smoothing=lab.real_smoothing)


def weight_decay(cfg: Config) -> float:
    """Reference code: 5e-4 for dMpRL-I/II, 1e-4 otherwise, unless ``reid.weight_decay`` is set."""
    if cfg.reid.weight_decay is not None:
        return cfg.reid.weight_decay
    return 5e-4 if cfg.labels.method in ("dmprl1", "dmprl2") else 1e-4


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------- one epoch

def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, spec: LabelSpec, epoch: int,
                    *, static_ranks: torch.Tensor | None, device: torch.device, amp: bool,
                    channels_last: bool = False, on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass of the identification net; returns mean loss, accuracy on real images and images/s.

    Running totals stay on the device (no host sync per step); finiteness is checked every few steps.
    """
    model.train()
    totals = _new_totals(device)
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if on_step:
            on_step(step)
        batch = to_device(batch, device)
        x = batch["img"]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)  # [B, C]
        ranks = static_ranks[batch["gen_row"].clamp(min=0)] if static_ranks is not None else None
        targets, weights = targets_for(spec, logits.float(), batch["label"], batch["generated"], epoch, ranks)
        loss = soft_cross_entropy(logits, targets, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _accumulate(totals, loss, logits[:, :spec.num_classes], batch["label"], ~batch["generated"], epoch, step)
    return _epoch_metrics(totals, time.perf_counter() - start, epoch)


def train_one_epoch_pairs(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, spec: LabelSpec,
                          epoch: int, *, static_ranks: torch.Tensor | None, device: torch.device,
                          amp: bool, channels_last: bool = False,
                          on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass of the two-stream net: 0.5 id1 + 0.5 id2 + verification on real pairs (Zheng et al.)."""
    model.train()
    totals = _new_totals(device)
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if on_step:
            on_step(step)
        batch = to_device(batch, device)
        x1, x2 = batch["img1"], batch["img2"]
        if channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits1, logits2, verif = model(x1, x2)
        parts = []
        for s, logits in (("1", logits1), ("2", logits2)):
            ranks = static_ranks[batch["gen_row" + s].clamp(min=0)] if static_ranks is not None else None
            parts.append(targets_for(spec, logits.float(), batch["label" + s], batch["generated" + s], epoch, ranks))
        loss = two_stream_loss(logits1, logits2, verif, parts[0][0], parts[1][0], batch["same"],
                               id_loss_fn=soft_cross_entropy, weights1=parts[0][1], weights2=parts[1][1],
                               verif_mask=batch["verif"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _accumulate(totals, loss, logits1[:, :spec.num_classes], batch["label1"], ~batch["generated1"], epoch, step)
        totals["images"] += len(batch["img2"])
    return _epoch_metrics(totals, time.perf_counter() - start, epoch)


CHECK_EVERY = 25  # steps between loss finiteness checks (each one is a host-device sync)


def _new_totals(device: torch.device) -> dict:
    zero = torch.zeros((), device=device)
    return {"loss": zero.clone(), "correct": zero.clone(), "real": zero.clone(), "images": 0}


def _accumulate(totals: dict, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                real: torch.Tensor, epoch: int, step: int) -> None:
    totals["loss"] += loss.detach().float() * len(labels)
    totals["images"] += len(labels)
    totals["correct"] += ((logits.detach().argmax(1) == labels) & real).sum()
    totals["real"] += real.sum()
    if step % CHECK_EVERY == CHECK_EVERY - 1:
        _check_finite(totals["loss"], epoch, step)


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(f"re-ID loss became {loss_sum.item()} by epoch {epoch} step {step}; lower reid.lr?")


def _epoch_metrics(totals: dict, seconds: float, epoch: int) -> dict[str, float]:
    _check_finite(totals["loss"], epoch, -1)
    n = max(totals["images"], 1)
    return {"loss": float(totals["loss"]) / n, "train_acc": float(totals["correct"]) / max(float(totals["real"]), 1),
            "images_per_s": totals["images"] / max(seconds, 1e-9), "epoch_time_s": seconds}


# ------------------------------------------------------------------------------------- the worker loop

def reid_loop(config: dict) -> dict[str, Any]:
    """Per-worker training loop (run by :func:`trainables.runtime.fit`). Returns rank 0's final metrics."""
    cfg, inputs = from_dict(config["cfg"]), ReidInputs(**config["inputs"])
    ctx = runtime.context()
    seed_everything(cfg.reid.seed * 1000 + ctx.rank)
    split = load(inputs.data_root)
    gen, static_ranks = _generated(cfg, inputs)
    records = (*split.train, *gen)
    num_classes = split.num_train_ids
    spec = label_spec(cfg, num_classes)
    model, optimizer, scheduler = _build(cfg, spec, ctx)
    start_epoch, history = _resume(model, optimizer, scheduler)
    static = torch.from_numpy(static_ranks.astype(np.int64)).to(ctx.device) if static_ranks is not None else None
    amp = cfg.reid.amp and ctx.device.type == "cuda"
    channels_last = cfg.reid.channels_last and ctx.device.type == "cuda"
    final: dict[str, Any] = dict(history.get("final", {}))
    plan = runtime.FailurePlan.parse(config["inject_failure"]) if config.get("inject_failure") else None
    for epoch in range(start_epoch, cfg.reid.epochs):
        # Reseed per epoch: a run resumed from the epoch-(e-1) checkpoint replays epoch e exactly.
        seed_everything(cfg.reid.seed * 1000 + ctx.rank + 7919 * epoch)
        loader = _epoch_loader(cfg, split.train, records, len(gen), spec, epoch, ctx)
        step_fn = train_one_epoch_pairs if cfg.reid.model == "twostream" else train_one_epoch
        hook = (lambda step, e=epoch: plan.maybe_fail(config["run_dir"], config["run_name"], ctx.rank, e, step)) \
            if plan else None
        metrics = step_fn(model, loader, optimizer, spec, epoch, static_ranks=static, device=ctx.device, amp=amp,
                          channels_last=channels_last, on_step=hook)
        scheduler.step()
        metrics.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"])
        last = epoch == cfg.reid.epochs - 1
        if ctx.rank == 0 and (last or (cfg.reid.eval_every and (epoch + 1) % cfg.reid.eval_every == 0)):
            final = evaluate_model(runtime.unwrap(model), split, cfg, ctx.device)
            metrics.update({k: final[k] for k in (*METRICS, "mINP")})
        _log_epoch(ctx.rank, epoch, cfg.reid.epochs, metrics)
        state = None
        if ctx.rank == 0:
            state = {"epoch": epoch, "model": runtime.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "final": final, "num_classes": num_classes,
                     "num_outputs": num_outputs(spec), "config": to_dict(cfg)}
        runtime.report(metrics, state=state)
    return {**final, "epoch": cfg.reid.epochs - 1, "num_classes": num_classes, "num_gan": len(gen),
            "num_train": len(split.train)}


def _generated(cfg: Config, inputs: ReidInputs) -> tuple[tuple[Record, ...], np.ndarray | None]:
    if cfg.labels.method == "baseline" or cfg.labels.num_gan == 0:
        return (), None
    if not inputs.store_root:
        raise ValueError(f"labels.method={cfg.labels.method!r} with labels.num_gan={cfg.labels.num_gan} needs a "
                         f"generated-image store (run the generation stage or pass --gan-store)")
    store = GeneratedStore(inputs.store_root)
    gen = store.records(cfg.labels.num_gan)
    if cfg.labels.method != "smprl":
        return gen, None
    found = store.read_labels(inputs.smprl_labels) if inputs.smprl_labels else None
    if found is None:
        raise ValueError(f"labels.method='smprl' needs static labels in {store.root}/labels "
                         f"(name {inputs.smprl_labels!r}); run the sMpRL label stage first")
    return gen, found[0][: len(gen)]


def _build(cfg: Config, spec: LabelSpec, ctx: runtime.Context):
    r = cfg.reid
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    model = build_reid_model(r.model, num_outputs(spec), r.backbone, r.embed_dim, r.dropout,
                             pretrained_path=r.pretrained, last_stride=r.last_stride,
                             channels_last=ctx.device.type == "cuda" and r.channels_last)
    groups = model.param_groups(r.lr, new_lr_mult=r.new_lr_mult, weight_decay=weight_decay(cfg))
    model = runtime.wrap_model(model, find_unused_parameters=r.model == "twostream")
    optimizer = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov)
    step = max(1, round(r.lr_step * r.epochs))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=r.lr_gamma)
    return model, optimizer, scheduler


def _resume(model, optimizer, scheduler) -> tuple[int, dict]:
    state = runtime.load_state()
    if state is None:
        return 0, {}
    runtime.unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming re-ID training after epoch %d", state["epoch"])
    return state["epoch"] + 1, {"final": state.get("final", {})}


def _epoch_loader(cfg: Config, train: tuple[Record, ...], records: tuple[Record, ...], n_gen: int,
                  spec: LabelSpec, epoch: int, ctx: runtime.Context):
    r = cfg.reid
    n_gen_epoch = n_gen if samples_generated(spec, epoch) else 0
    pin = ctx.device.type == "cuda"
    seed = r.seed * 1000
    if r.model == "twostream":
        labels = np.array([rec.label for rec in train])
        pos = r.pos_fraction if r.pos_fraction is not None else pos_fraction_for_epoch(epoch)
        pairs = epoch_pairs(labels, n_gen_epoch, pos_fraction=pos, seed=seed, epoch=epoch)
        batches = epoch_batches(len(pairs), 0, max(2, r.batch_size // 2), gen_fraction=None, seed=seed + 1,
                                epoch=epoch, rank=ctx.rank, world_size=ctx.world_size)
        return pair_loader(records, pairs, batches, r.image_size, workers=r.loader_workers, pin_memory=pin)
    batches = epoch_batches(len(train), n_gen_epoch, r.batch_size, gen_fraction=r.gen_fraction, seed=seed,
                            epoch=epoch, rank=ctx.rank, world_size=ctx.world_size)
    return train_loader(records, batches, r.image_size, workers=r.loader_workers, pin_memory=pin)


def _log_epoch(rank: int, epoch: int, epochs: int, m: dict) -> None:
    if rank != 0:
        return
    evald = f"  rank-1 {m['rank1']:.3f}  mAP {m['mAP']:.3f}" if "rank1" in m else ""
    print(f"[reid] epoch {epoch + 1}/{epochs}  loss {m['loss']:.4f}  acc {m['train_acc']:.3f}  "
          f"{m['images_per_s']:.0f} img/s{evald}", flush=True)


# ------------------------------------------------------------------------------------- driver

def train_reid(cfg: Config, inputs: ReidInputs, run_parent: str | Path, name: str, *,
               report_to_tune: bool = False, max_failures: int = 0,
               inject_failure: str | None = None) -> dict[str, Any]:
    """Run one re-ID training (Ray Train worker group, or in-process when ``reid.num_workers == 0``).

    ``inject_failure`` (default: the ``MPRL_INJECT_FAILURE`` environment variable) is the fault-injection
    hook of :class:`trainables.runtime.FailurePlan`, for reliability tests.
    """
    spec = runtime.RunSpec(name=name, storage_path=str(run_parent), num_workers=cfg.reid.num_workers,
                           use_gpu=cfg.reid.use_gpu, max_failures=max_failures, report_to_tune=report_to_tune)
    inject = inject_failure if inject_failure is not None else os.environ.get(runtime.FAILURE_ENV)
    if inject:
        runtime.FailurePlan.parse(inject)  # a malformed spec fails here, on the driver
    config = {"cfg": to_dict(cfg), "inputs": inputs.__dict__, "inject_failure": inject,
              "run_dir": str(spec.run_dir), "run_name": name}
    return runtime.fit(reid_loop, config, spec)


def load_trained(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a run's latest checkpoint (eval mode, CPU) and return it with the checkpoint state."""
    ckpt = runtime.latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}")
    state = torch.load(Path(ckpt) / runtime.STATE_FILE, map_location="cpu", weights_only=False)
    cfg = from_dict(state["config"])
    r = cfg.reid
    model = build_reid_model(r.model, state["num_outputs"], r.backbone, r.embed_dim, r.dropout,
                             last_stride=r.last_stride)
    model.load_state_dict(state["model"])
    return model.eval(), state


# ------------------------------------------------------------------------------------- CLI

def prepare_dataset(cfg: Config, cache: Path) -> str:
    """The dataset root: ``dataset.root`` for real data; the synthetic set generated (once) under ``cache``."""
    if cfg.dataset.name != "synthetic":
        return str(Path(cfg.dataset.root).expanduser())
    from datasets.synthetic import generate
    from orchestrator.config import config_hash

    d = cfg.dataset
    if d.root:  # an existing synthetic tree is only read; nothing is written outside the storage path
        root = Path(d.root).expanduser()
        if not (root / "synthetic.json").is_file():
            raise ValueError(f"dataset.root={d.root} is not a synthetic dataset written by datasets.synthetic; "
                             f"leave dataset.root unset to generate one under the storage path")
        load(root)
        return str(root)
    root = cache / f"synthetic-{config_hash(cfg, 'dataset')}"
    generate(root, ids=d.synthetic_ids, images_per_id=d.synthetic_images_per_id,
             distractors=d.synthetic_distractors, junk=d.synthetic_junk, size=d.synthetic_size,
             seed=d.synthetic_seed, progress=True)
    return str(root)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from orchestrator.config import load_config

    p = argparse.ArgumentParser(description="Train and evaluate one re-ID configuration.")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--config", help="YAML file of overrides")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--label-method")
    p.add_argument("--num-gan", type=int)
    p.add_argument("--gan-store", help="generated-image store folder (from the generation stage)")
    p.add_argument("--smprl-labels", help="name of the static label file in the store (sMpRL)")
    p.add_argument("--out", default="runs/reid", help="where the run (checkpoints) and a synthetic dataset go")
    p.add_argument("--name", help="run name (default from the method); reusing one resumes it")
    args = p.parse_args(argv)
    extra = [f"labels.method={args.label_method}"] if args.label_method else []
    extra += [f"labels.num_gan={args.num_gan}"] if args.num_gan is not None else []
    try:
        cfg = load_config(args.preset, file=args.config, overrides=[*args.overrides, *extra])
        out = Path(args.out).resolve()
        inputs = ReidInputs(prepare_dataset(cfg, out / "data"), args.gan_store and str(Path(args.gan_store).resolve()),
                            args.smprl_labels)
        if cfg.reid.num_workers > 0:
            import ray

            ray.init(num_cpus=max(2, cfg.reid.num_workers), include_dashboard=False)
        name = args.name or f"reid-{cfg.labels.method}-{cfg.labels.num_gan}"
        res = train_reid(cfg, inputs, out / "runs", name)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"final: rank-1 {res['rank1']:.4f}  rank-5 {res['rank5']:.4f}  rank-10 {res['rank10']:.4f}  "
          f"mAP {res['mAP']:.4f}  ({res['num_classes']} ids, {res['num_gan']} generated images)")
    return 0


if __name__ == "__main__":  # run the imported module's main, so Ray pickles functions by reference
    from trainables.reid import main as _main

    sys.exit(_main())
