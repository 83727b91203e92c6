"""One model per label method of a sweep in MLflow's model registry, chosen without looking at a test metric.

Per (label method, pool, setting) of the sweep, the finished trial with a logged model (``mprl.model_uri``) whose
last **validation** rank-1 (``val_rank1``, the held-out training identities of ``reid.val_ids``) is highest becomes a
new version of the registered model ``mprl-<experiment>-<method>`` (``-<pool>`` when it is not the DCGAN's pool,
``-<setting>`` when the sweep has several settings). A sweep without a validation split has no honest "best": the
version is then the trial with the lowest final training loss, and its tags say so (``mprl.selected_by``); runs
with neither (a baseline trial that reused its seed's baseline stage) give the lowest seed's. The test
metrics are copied onto the version as tags for the reader, never compared. Each version's tags name the sweep, the
trial, its seed and #GAN, and what chose it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator import tracking
from orchestrator.groups import pool_label, setting_of

SELECT_BY = ("val_rank1", "max")  # the validation metric, higher is better
FALLBACK = ("loss", "min")  # the last epoch's training loss, lower is better (no validation split)
SEED = "seed"  # runs with neither metric: the lowest seed


@dataclass(frozen=True)
class Registered:
    """One registered version: the model's name and version, the trial it came from and what chose it."""

    name: str
    version: str
    run_id: str
    trial: str
    selected_by: str
    value: float


def choose(runs: list) -> tuple[object, str, float] | None:
    """(run, metric, value) of the chosen run among ``runs`` (MLflow runs of one method), or None when none has a
    selection metric."""
    for metric, mode in (SELECT_BY, FALLBACK):
        have = [r for r in runs if metric in r.data.metrics]
        if have:
            pick = (max if mode == "max" else min)(have, key=lambda r: r.data.metrics[metric])
            return pick, metric, pick.data.metrics[metric]
    if not runs:
        return None
    # neither (a baseline trial that reused its seed's baseline stage logs no epochs): the lowest seed, by rule
    pick = min(runs, key=lambda r: int(r.data.params.get("reid.seed", 0)))
    return pick, SEED, float(pick.data.params.get("reid.seed", 0))


def register_best(client, exp_id: str, experiment: str, parent: str, sweep_name: str) -> list[Registered]:
    """Register the chosen model of each label method of sweep ``parent``; returns what was registered."""
    filt = (f"tags.`{tracking.TAG_KIND}` = 'trial' and attributes.status = 'FINISHED' and "
            f"tags.`{tracking.TAG_PARENT}` = '{parent}'")
    runs = [r for r in client.search_runs([exp_id], filt, max_results=50000) if r.data.tags.get("mprl.model_uri")]
    groups: dict[tuple[str, str, str], list] = {}
    for r in runs:
        p = r.data.params
        groups.setdefault((p.get("labels.method", "?"), pool_label(p), setting_of(p)), []).append(r)
    settings = {k[2] for k in groups}
    out = []
    for (method, pool, setting), members in sorted(groups.items()):
        picked = choose(members)
        if picked is None:
            continue
        run, metric, value = picked
        name = "-".join(["mprl", experiment, method, *([pool] if pool != "gan" else []),
                         *([setting] if len(settings) > 1 else [])])
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        if _registered(client, name, parent):  # a --resume of a finished sweep: its versions exist
            continue
        out.append(_register(client, name, run, metric, value, sweep_name, parent))
    return out


def _registered(client, name: str, parent: str) -> bool:
    """Whether model ``name`` already has a version from sweep ``parent``."""
    versions = client.search_model_versions(f"name = '{name}'")
    return any(v.tags.get("mprl.sweep_run") == parent for v in versions)


def _register(client, name: str, run, metric: str, value: float, sweep_name: str, parent: str) -> Registered:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="mprl-orchestrator: one version per sweep and label "
                                                          "method, chosen on validation (orchestrator/registry.py)")
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    p, m = run.data.params, tracking.fractions(run)
    why = {SELECT_BY[0]: metric, FALLBACK[0]: f"{metric} (no validation split: reid.val_ids=0)"}.get(
        metric, "the lowest seed (no validation split, no training metric: a reused baseline stage)")
    tags = {"mprl.sweep": sweep_name, "mprl.sweep_run": parent, "mprl.trial": p.get("trial", "?"),
            "mprl.seed": p.get("reid.seed", "?"), "mprl.num_gan": p.get("labels.num_gan", "?"),
            "mprl.selected_by": why, "mprl.selection_value": f"{value:.6g}",
            **{f"mprl.test_{k}": f"{100 * m[f'final_{k}']:.2f}" for k in ("rank1", "mAP") if f"final_{k}" in m}}
    version = client.create_model_version(name, source=run.data.tags["mprl.model_uri"], run_id=run.info.run_id,
                                          tags=tags)
    return Registered(name, str(version.version), run.info.run_id, p.get("trial", "?"), why, value)


def summary(registered: list[Registered]) -> str:
    """The lines the sweep prints after registering."""
    if not registered:
        return "[registry] no trial logged a model: nothing registered"
    return "\n".join(f"[registry] {r.name} version {r.version}: trial {r.trial} (chosen by {r.selected_by} = "
                     f"{r.value:.4g})" for r in registered)
