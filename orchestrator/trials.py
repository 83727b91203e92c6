"""The sweep's trials as an explicit list, what a trial needs besides its settings, and what it ends with.

Each trial is one re-ID training on real + labelled generated images. Settings that cannot differ are folded
(a baseline has no #GAN images; a method without ranks has no rank order or keep; 0 generated images is the
baseline), so the grid holds no duplicate trainings. The Tune search space holds only the :class:`TrialSpec` of
each trial; everything constant (the config, the stage outputs, MLflow) travels in one frozen
:class:`TrialContext`; the sweep's table reads one :class:`TrialRow` per trial.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import Config
from trainables.config import METRICS, ReidInputs, cross_domain_name
from trainables.methods import BASELINE, method

EPOCH_METRICS = ("loss", "train_acc", "images_per_s", "lr", "val_rank1", "val_mAP", *METRICS, "mINP")
# tags of a finished trial's MLflow run naming what its final model was trained and tested on (orchestrator.export
# reads them): its run folder (the checkpoint), the dataset root and the cross-domain test sets (JSON: name -> folder)
TAG_RUN_DIR = "mprl.run_dir"
TAG_DATA_ROOT = "mprl.data_root"
TAG_TEST_ROOTS = "mprl.test_roots"


def input_tags(run_dir: str | Path, data_root: str, test_roots: tuple[str, ...]) -> dict[str, str]:
    """The tags of a run whose final model ``orchestrator.export`` can read: its run folder, dataset and test sets."""
    tests = {cross_domain_name(root): root for root in test_roots}
    return {TAG_RUN_DIR: str(run_dir), TAG_DATA_ROOT: data_root, TAG_TEST_ROOTS: json.dumps(tests)}


@dataclass(frozen=True)
class TrialSpec:
    """The searched settings of one trial."""

    method: str
    num_gan: int
    order: str = "paper"
    keep: int | None = None
    seed: int = 0
    lr_scheme: str | None = None  # None: the config's reid.lr_scheme; else the learning-rate ablation's
    pool: str | None = None  # None: the config's labels.pool; else one of sweep.pools

    @property
    def key(self) -> str:
        keep = "all" if self.keep is None else self.keep
        lr = "" if self.lr_scheme is None else f"-lr{self.lr_scheme}"
        pool = "" if self.pool is None else f"-p{self.pool}"
        return f"{self.method}-n{self.num_gan}-{self.order}-k{keep}-s{self.seed}{lr}{pool}"

    @classmethod
    def from_key(cls, key: str) -> "TrialSpec":
        """The inverse of :attr:`key` (what Tune's search space and live table hold)."""
        method, n, order, keep, seed, *rest = key.split("-")
        lr = next((r[2:] for r in rest if r.startswith("lr")), None)
        pool = next((r[1:] for r in rest if r.startswith("p")), None)
        return cls(method, int(n[1:]), order, None if keep == "kall" else int(keep[1:]), int(seed[1:]), lr, pool)

    def overrides(self) -> dict[str, Any]:
        """The config fields this trial sets. ``reid.lr_scheme`` only for the ablation's trials: it is not a swept
        field of the report, so they form their own setting (with their own baselines); ``labels.pool`` only for
        the trials on another pool (a column of the report)."""
        lr = {} if self.lr_scheme is None else {"reid.lr_scheme": self.lr_scheme}
        pool = {} if self.pool is None else {"labels.pool": self.pool}
        return {"labels.method": self.method, "labels.num_gan": self.num_gan, "labels.order": self.order,
                "labels.keep": self.keep, "reid.seed": self.seed, **lr, **pool}

    @property
    def reuses_baseline(self) -> bool:
        """A baseline trial of the config's own learning-rate scheme: its seed's baseline stage is its result."""
        return self.method == BASELINE and self.lr_scheme is None


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares, passed with ``tune.with_parameters`` (not part of the search space).

    It names the sweep, not its MLflow runs or store: a trial finds its run by tags (``tracking.find_trial``) in
    the store of the sweep that runs or resumes it (a resumed sweep may point at a new MLflow after losing its
    head node).
    """

    cfg: Config
    sweep: str  # the sweep's name: with the trial's key, its run's ``mprl.key`` tag
    inputs: ReidInputs  # the dataset and the generated store; the sMpRL label file is per seed (below)
    trials_dir: str
    links: dict[str, str]  # MLflow tags naming the stages every trial used (dataset, GAN, generation)
    baselines: dict[int, str] = field(default_factory=dict)  # seed -> that seed's baseline stage folder
    smprl_labels: dict[int, str] = field(default_factory=dict)  # seed -> its sMpRL label file in the store
    seed_links: dict[int, dict[str, str]] = field(default_factory=dict)  # seed -> tags of its baseline/sMpRL
    needs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # trial key -> stage folders it reads
    stores: dict[str, str] = field(default_factory=dict)  # a pool of sweep.pools -> its store folder
    pool_links: dict[str, dict[str, str]] = field(default_factory=dict)  # a pool of sweep.pools -> its stage tags
    log_models: bool = True


def normalise(t: TrialSpec) -> TrialSpec:
    """The one trial ``t`` stands for: no extra images (or none of them) is the baseline; a method without ranks
    has no order or keep (the compute-matched control keeps its #GAN: the number of steps it matches)."""
    traits = method(t.method)
    if not traits.extra_images or t.num_gan == 0:
        return TrialSpec(BASELINE, 0, "paper", None, t.seed, t.lr_scheme)
    pool = t.pool if traits.generated else None  # the compute-matched control has no pool
    if not traits.ranked:
        return TrialSpec(t.method, t.num_gan, "paper", None, t.seed, t.lr_scheme, pool)
    return dataclasses.replace(t, pool=pool)


def cost(t: TrialSpec) -> tuple[int, int]:
    """Sort key, longest first: a baseline trial reuses its stage (instant); more generated images, more steps."""
    return (0 if t.reuses_baseline else 1, t.num_gan)


def build_trials(cfg: Config) -> list[TrialSpec]:
    """Every distinct trial of the grid (``sweep.search=grid``) or ``num_samples`` draws from it (random)."""
    s = cfg.sweep
    seen: dict[str, TrialSpec] = {}
    for seed in s.seeds:
        for name in s.methods:
            for n in s.num_gan:
                for order in s.orders:
                    if order != "paper" and s.orders_at and n not in s.orders_at:
                        continue
                    for keep in s.keeps:
                        t = normalise(TrialSpec(name, n, order, keep, seed))
                        seen.setdefault(t.key, t)
    for scheme in s.lr_schemes:  # the learning-rate ablation: every method (its own baselines) at lr_schemes_at
        for seed in s.seeds:
            for name in s.methods:
                if method(name).static_ranks:  # their labels come from the config's scheme's baseline
                    continue
                for n in s.num_gan:
                    if s.lr_schemes_at and n not in s.lr_schemes_at:
                        continue
                    t = normalise(TrialSpec(name, n, "paper", None, seed, scheme))
                    seen.setdefault(t.key, t)
    for pool in s.pools:  # the other pools: the generated methods of pool_methods (their labels from their images)
        for seed in s.seeds:
            for name in s.pool_methods or s.methods:
                if not method(name).generated or method(name).static_ranks:
                    continue
                for n in s.num_gan:
                    t = normalise(TrialSpec(name, n, "paper", None, seed, None, pool))
                    seen.setdefault(t.key, t)
    trials = list(seen.values())
    if s.search == "random":
        rng = random.Random(f"{s.seeds}-{s.num_samples}")
        trials = rng.sample(trials, min(s.num_samples, len(trials)))
    return trials


@dataclass(frozen=True)
class TrialRow:
    """One line of the sweep's table: a trial's settings, its final test metrics, and how it ended."""

    spec: TrialSpec
    rank1: float | None = None  # fractions in [0, 1]; None when it did not finish
    rank5: float | None = None
    rank10: float | None = None
    mAP: float | None = None
    seconds: float | None = None  # the trial's worker time (imports, training, evaluation, logging)
    error: str | None = None  # why it failed, or "not run"
    status: str | None = None  # its MLflow run's status (FINISHED, FAILED, KILLED, ...)
    stopped_after: str | None = None  # epochs trained when a scheduler (ASHA) stopped it
    where: str | None = None  # node and process it ran on

    @property
    def key(self) -> str:
        return self.spec.key

    def as_dict(self) -> dict[str, Any]:
        """Flat and JSON-serialisable (the sweep's ``results.json``)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "spec"}
        return {"trial": self.key, **dataclasses.asdict(self.spec), **fields}
