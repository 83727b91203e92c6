"""Stable path of the label functions (docs/architecture.md, "Stable interfaces"): they live in
:mod:`trainables.reid.labels`; nothing in the project imports this module."""

from trainables.reid.labels import (  # noqa: F401
    LabelSpec,
    lsro_targets,
    mprl_normaliser,
    mprl_targets,
    mprl_weights,
    ranks_from_probs,
    soft_cross_entropy,
    targets_for,
    weights_from_ranks,
)

if __name__ == "__main__":  # an old path, not a command
    raise SystemExit("trainables.labels is a library path, not a command: train with `python -m orchestrator.train "
                     "reid|gan`, run a sweep with `python -m orchestrator.sweep`")
