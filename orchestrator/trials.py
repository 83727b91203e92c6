"""The sweep's trials: the search space as an explicit list, the Tune trial function, and its MLflow logging.

Each trial is one re-ID training on real + labelled generated images. Settings that cannot differ are folded
(a baseline has no #GAN images; LSRO has no rank order; 0 generated images is the baseline), so the grid holds
no duplicate trainings. A baseline trial with the stage baseline's seed reuses that stage's result.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Config, flat_dict, from_dict, replace

MPRL_METHODS = ("smprl", "dmprl1", "dmprl2")
EPOCH_METRICS = ("loss", "train_acc", "images_per_s", "lr", "rank1", "rank5", "rank10", "mAP", "mINP")


@dataclass(frozen=True)
class Trial:
    method: str
    num_gan: int
    order: str = "paper"
    keep: int | None = None
    seed: int = 0

    @property
    def key(self) -> str:
        keep = "all" if self.keep is None else self.keep
        return f"{self.method}-n{self.num_gan}-{self.order}-k{keep}-s{self.seed}"

    def overrides(self) -> dict[str, Any]:
        return {"labels.method": self.method, "labels.num_gan": self.num_gan, "labels.order": self.order,
                "labels.keep": self.keep, "reid.seed": self.seed}


def normalise(t: Trial) -> Trial:
    if t.method == "baseline" or t.num_gan == 0:
        return Trial("baseline", 0, "paper", None, t.seed)
    if t.method not in MPRL_METHODS:
        return Trial(t.method, t.num_gan, "paper", None, t.seed)
    return t


def build_trials(cfg: Config) -> list[Trial]:
    """Every distinct trial of the grid (``sweep.search=grid``) or ``num_samples`` draws from it (random)."""
    s = cfg.sweep
    seen: dict[str, Trial] = {}
    for seed in s.seeds:
        for method in s.methods:
            for n in s.num_gan:
                for order in s.orders:
                    for keep in s.keeps:
                        t = normalise(Trial(method, n, order, keep, seed))
                        seen.setdefault(t.key, t)
    trials = list(seen.values())
    if s.search == "random":
        rng = random.Random(f"{s.seeds}-{s.num_samples}")
        trials = rng.sample(trials, min(s.num_samples, len(trials)))
    return trials


# ------------------------------------------------------------------------------------ the Tune trial

def run_trial(config: dict) -> None:
    """Tune function: train (or reuse the baseline stage), then log final metrics, CMC plot and model."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking
    from trainables.reid import ReidInputs, train_reid

    trial = Trial(**config["trial"])
    cfg = replace(from_dict(config["cfg"]), **trial.overrides())
    import mlflow

    mlflow.set_tracking_uri(config["tracking_uri"])
    client = MlflowClient(config["tracking_uri"])
    run_id = config["run_ids"][trial.key]
    tracking.set_status(client, run_id, "RUNNING")
    tracking.log_params(client, run_id, {**flat_dict(cfg), "trial": trial.key})
    try:
        if config.get("baseline") and trial.method == "baseline" and trial.seed == cfg.reid.seed:
            result = _reuse_baseline(config["baseline"], client, run_id)
        else:
            if cfg.sweep.in_process and cfg.reid.num_workers <= 1:
                cfg = replace(cfg, **{"reid.num_workers": 0})
            inputs = ReidInputs(**config["inputs"])
            result = train_reid(cfg, inputs, config["trials_dir"], trial.key, report_to_tune=True,
                                max_failures=config.get("max_failures", 0))
        _finish(client, run_id, cfg, trial, result, Path(config["trials_dir"]) / trial.key, config)
    except BaseException as err:
        client.set_tag(run_id, "mprl.error", f"{type(err).__name__}: {err}"[:5000])
        tracking.set_status(client, run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


def _reuse_baseline(baseline: dict, client, run_id: str) -> dict:
    import ray.tune

    client.set_tag(run_id, "mprl.reused_stage", baseline["run_dir"])
    result = {**baseline["metrics"], "cmc": baseline.get("cmc", [])}
    ray.tune.report({k: v for k, v in result.items() if k in EPOCH_METRICS or k == "epoch"})
    return result


def _finish(client, run_id: str, cfg: Config, trial: Trial, result: dict, run_dir: Path, config: dict) -> None:
    from orchestrator import tracking
    from trainables.plots import plot_cmc

    final = {k: result[k] for k in ("rank1", "rank5", "rank10", "mAP", "mINP") if k in result}
    tracking.log_metrics(client, run_id, {f"final_{k}": v for k, v in final.items()})
    tracking.log_params(client, run_id, {f"data.{k}": result[k] for k in ("num_train", "num_classes") if k in result})
    for tag, value in config.get("links", {}).items():
        client.set_tag(run_id, tag, value)
    with tempfile.TemporaryDirectory() as tmp:
        if result.get("cmc"):
            import numpy as np

            png = plot_cmc({trial.key: np.asarray(result["cmc"])}, Path(tmp) / "cmc.png", title=trial.key)
            tracking.log_artifacts(client, run_id, [png], "plots")
    if config.get("log_models", True):
        _log_model(client, run_id, cfg, run_dir if run_dir.exists() else Path(config["baseline"]["run_dir"]))
    tracking.set_status(client, run_id, "FINISHED")


def _log_model(client, run_id: str, cfg: Config, run_dir: Path) -> None:
    import numpy as np

    from orchestrator import tracking
    from trainables.reid import load_trained

    try:
        model, _ = load_trained(run_dir)
    except FileNotFoundError:
        return
    h, w = cfg.reid.image_size
    uri = tracking.log_model(run_id, model, np.zeros((1, 3, h, w), dtype=np.float32))
    client.set_tag(run_id, "mprl.model_uri", uri)


def trial_space(trials: list[Trial]) -> list[dict]:
    return [asdict(t) for t in trials]
