"""Checks across the root config's sections: what no single section can see.

:func:`check_root` runs on every :class:`~orchestrator.config.Config` (a trial's too); :func:`check_lists` on a
config :func:`~orchestrator.config.load_config` resolved (a trial's config legitimately breaks it);
:func:`check_switch` on the label methods a command trains: the sweep's trials (:func:`check_sweep_switch`) or one
run's method (:func:`check_run_switch`). Each raises ``ValueError`` naming the fields, before any cluster time.

This module imports nothing from :mod:`orchestrator.config` at module level (that module imports this one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from trainables.methods import PAPER_SWITCH_FRACTION, method, switch_epoch_for

if TYPE_CHECKING:
    from orchestrator.config import Config

ALGORITHM_1 = "paper"  # labels.switch: the switch epoch applies (reference_code follows each script's coded switch)


def check_root(cfg: Any) -> None:
    """The checks of :class:`~orchestrator.config.Config` that read two sections."""
    if cfg.sweep.asha and cfg.reid.eval_every == 0:
        raise ValueError("sweep.asha=true needs reid.eval_every > 0 and reid.val_ids > 0 (ASHA compares trials "
                         "on the validation split's rank-1, never on the test split)")
    if cfg.labels.keep is not None and cfg.dataset.name == "synthetic":
        if cfg.labels.keep > cfg.dataset.synthetic_ids:
            raise ValueError(
                f"labels.keep={cfg.labels.keep} exceeds the number of training ids "
                f"(dataset.synthetic_ids={cfg.dataset.synthetic_ids})")
    pools = (cfg.labels.pool, *cfg.sweep.pools)
    if "folder" in pools and not cfg.labels.pool_root:
        raise ValueError("a folder pool (labels.pool or sweep.pools) needs labels.pool_root=PATH")
    if "synthetic_ids" in pools and cfg.dataset.name != "synthetic":
        raise ValueError(f"the synthetic_ids pool draws unseen identities with the synthetic generator: it needs "
                         f"dataset.name=synthetic, not {cfg.dataset.name!r}; for real data use labels.pool=folder "
                         f"with labels.pool_root=PATH (e.g. another dataset's training images)")
    if cfg.dataset.name != "synthetic" and cfg.reid.pretrained is None:
        raise ValueError(
            f"reid.pretrained is not set for dataset.name={cfg.dataset.name!r}: use imagenet (the paper), "
            "a local file, or random to train from scratch on purpose")


def check_lists(cfg: Config) -> None:
    """The sweep's lists of other pools and learning-rate schemes name only what the config itself does not run."""
    if cfg.labels.pool in cfg.sweep.pools or len(set(cfg.sweep.pools)) < len(cfg.sweep.pools):
        raise ValueError(f"sweep.pools={list(cfg.sweep.pools)} repeats a pool or labels.pool={cfg.labels.pool!r} "
                         f"(the config's pool runs anyway): list only the other pools")
    if cfg.reid.lr_scheme in cfg.sweep.lr_schemes:  # not in Config: an ablation trial's config has both
        raise ValueError(f"sweep.lr_schemes={list(cfg.sweep.lr_schemes)} repeats reid.lr_scheme="
                         f"{cfg.reid.lr_scheme!r}: list only the other schemes (the ablation)")


def switch_epoch(labels: Any, epochs: int) -> int:
    """The 0-based epoch from which a switched method's generated images carry loss: ``labels.switch_at``, else
    ``labels.switch_epoch`` x epochs rounded half up (``trainables.methods.switch_epoch_for``, as the loop does)."""
    return labels.switch_at if labels.switch_at is not None else switch_epoch_for(epochs, labels.switch_epoch)


def check_switch(cfg: Config, methods: Iterable[str]) -> None:
    """A switched method (pseudo, dMpRL-II: ``Method.switched``) among ``methods`` whose switch epoch is not inside
    training (``>= reid.epochs``) would never switch its generated images' loss on: refuse, naming both fields."""
    switched = sorted({m for m in methods if method(m).switched})
    epochs = cfg.reid.epochs
    at = switch_epoch(cfg.labels, epochs)
    if not switched or cfg.labels.switch != ALGORITHM_1 or at < epochs:
        return
    if cfg.labels.switch_at is not None:
        suggest = switch_epoch_for(epochs)
        field, fix = (f"labels.switch_at={at}", f"lower labels.switch_at (e.g. {suggest}: 40% of training, as in "
                      f"the paper) or set it to null to switch at labels.switch_epoch={cfg.labels.switch_epoch} of "
                      f"training")
    else:
        field, fix = (f"labels.switch_epoch={cfg.labels.switch_epoch} (epoch {at})",
                      f"lower labels.switch_epoch (e.g. {PAPER_SWITCH_FRACTION}, as in the paper) or set "
                      f"labels.switch_at below reid.epochs")
    raise ValueError(f"{field} >= reid.epochs={epochs}: the label switch of {', '.join(switched)} would never happen "
                     f"(epochs are 0-based: 0..{epochs - 1}); {fix}")


def check_sweep_switch(cfg: Config) -> None:
    """:func:`check_switch` for the methods of the sweep's trials (after folding: a method at #GAN 0 is the
    baseline)."""
    from orchestrator.trials import build_trials

    check_switch(cfg, {t.method for t in build_trials(cfg)})


def check_run_switch(cfg: Config) -> None:
    """:func:`check_switch` for one run (``orchestrator.train reid``): its method, when it trains on extra images."""
    check_switch(cfg, [cfg.labels.method] if cfg.labels.num_gan > 0 else [])

